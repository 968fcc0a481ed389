"""soft_threshold and the sparsity penalties against hand computations."""
import pytest
import torch
import torch.nn as nn

from sparseq.prune import group_lasso_penalty, l1_penalty, soft_threshold


def test_soft_threshold_is_exact():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.2, 0.1], [-1.0, 0.3, 0.0]]))
        model[0].bias.fill_(0.05)
    masks = soft_threshold(model, 0.25)
    torch.testing.assert_close(model[0].weight, torch.tensor([[0.25, 0.0, 0.0], [-0.75, 0.05, 0.0]]))
    assert torch.equal(model[0].bias, torch.full((2,), 0.05))  # biases are not shrunk
    assert torch.equal(masks["0"], torch.tensor([[True, False, False], [True, True, False]]))
    assert masks.sparsity() == 0.5


def test_soft_threshold_refuses_a_negative_alpha():
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        soft_threshold(nn.Sequential(nn.Linear(2, 2)), -0.1)


def two_layers():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 3.0], [4.0, 0.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, 1.0, -1.0], [0.0, 2.0, 0.0]]))
    return model


def test_l1_penalty_matches_a_hand_sum_and_is_differentiable():
    model = two_layers()
    penalty = l1_penalty(model)
    assert float(penalty.detach()) == 10.0 + 5.0
    penalty.backward()
    assert torch.equal(model[0].weight.grad, model[0].weight.detach().sign())
    assert model[0].bias.grad is None
    assert float(l1_penalty(model, ignore=["0"]).detach()) == 5.0


def test_group_lasso_matches_hand_computations():
    model = two_layers()
    # Rows of layer 0: norms sqrt(5), 3, 4, each of 2 weights; layer 2: sqrt(3), 2, of 3 weights.
    rows = 2 ** 0.5 * (5 ** 0.5 + 3 + 4) + 3 ** 0.5 * (3 ** 0.5 + 2)
    assert float(group_lasso_penalty(model, "row").detach()) == pytest.approx(rows)
    # Columns of layer 0: norms sqrt(17), sqrt(13), of 3; layer 2: 1, sqrt(5), 1, of 2.
    columns = 3 ** 0.5 * (17 ** 0.5 + 13 ** 0.5) + 2 ** 0.5 * (1 + 5 ** 0.5 + 1)
    assert float(group_lasso_penalty(model, "column").detach()) == pytest.approx(columns)
    assert float(group_lasso_penalty(model, "channel").detach()) == pytest.approx(columns)
    # Layer 0 in 2x2 blocks: [[1,-2],[0,3]] (4 weights, norm sqrt(14)) and [4, 0] (2, norm 4);
    # layer 2: [[1,1],[0,2]] (4, sqrt(6)) and [-1, 0] (2, 1).
    blocks = 2 * 14 ** 0.5 + 2 ** 0.5 * 4 + 2 * 6 ** 0.5 + 2 ** 0.5 * 1
    assert float(group_lasso_penalty(model, (2, 2)).detach()) == pytest.approx(blocks)


def test_channel_groups_of_a_conv_take_every_tap_of_an_input_channel():
    conv = nn.Sequential(nn.Conv2d(2, 3, 2))
    with torch.no_grad():
        conv[0].weight.fill_(1.0)
        conv[0].weight[:, 1] = 2.0
    # Channel 0: 12 ones (norm sqrt(12)); channel 1: 12 twos (norm 2*sqrt(12)); weight sqrt(12).
    expected = 12 ** 0.5 * (12 ** 0.5 + 2 * 12 ** 0.5)
    assert float(group_lasso_penalty(conv, "channel", targets=(nn.Conv2d,)).detach()) == pytest.approx(expected)


def test_group_lasso_refuses_unknown_groups():
    with pytest.raises(ValueError, match="groups must be one of"):
        group_lasso_penalty(two_layers(), "neuron")


def train(penalty_weight, steps=300):
    """Least squares with more features than samples: only the first 4 of 32 inputs matter, but
    without a penalty the fit spreads weight over all of them."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 32, generator=generator)
    y = x[:, :4] @ torch.randn(4, 3, generator=generator) + 0.1 * torch.randn(24, 3, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if penalty_weight:
            loss = loss + penalty_weight * group_lasso_penalty(model, "column")
        loss.backward()
        optimizer.step()
    return torch.linalg.vector_norm(model[0].weight.detach(), dim=0)


def test_group_lasso_training_drives_whole_columns_to_zero():
    plain = train(0.0)
    penalised = train(0.1)
    assert int((plain[4:] < 1e-2).sum()) == 0
    assert int((penalised[4:] < 1e-2).sum()) >= 24  # most of the 28 irrelevant inputs
    assert (penalised[:4] > 0.1).all()  # the inputs that matter survive
