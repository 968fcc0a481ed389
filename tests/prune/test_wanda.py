"""Wanda: |W| * ||X_j|| scores, per-row groups, layer-by-layer calibration."""
import pytest
import torch
import torch.nn as nn

from sparseq.prune import wanda
from sparseq.prune.patterns import mask_from_scores
from sparseq.prune.sequential import execution_groups
from sparseq.prune.wanda import wanda_scores

from .conftest import MLP


def test_hand_checkable_case_prunes_the_expected_columns():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.1, 1.0, 1.0]]))
    # Input column norms over the two batches: sqrt(1) = 1, 10, 0.1, sqrt(9 + 16) = 5.
    calib = [torch.tensor([[1.0, 0.0, 0.0, 3.0]]), torch.tensor([[0.0, 10.0, 0.1, 4.0]])]
    masks = wanda(model, calib, 0.5)
    # Row 0 scores 1, 10, 0.1, 5 -> columns 2 and 0 go; row 1 scores 4, 1, 0.1, 5 -> 2 and 1 go.
    expected = torch.tensor([[False, True, False, True], [True, False, False, True]])
    assert torch.equal(masks["0"], expected)
    assert torch.equal(model[0].weight, torch.tensor([[0.0, 1.0, 0.0, 1.0], [4.0, 0.0, 0.0, 1.0]]))


def test_unstructured_sparsity_is_exact_in_every_row(mlp):
    masks = wanda(mlp, [torch.randn(8, 16) for _ in range(3)], 0.6)
    for name, mask in masks.items():
        per_row = int(0.6 * mask.shape[1] + 0.5)
        assert ((~mask).sum(dim=1) == per_row).all()
        assert ((mlp.get_submodule(name).weight == 0) == ~mask).all()


@pytest.mark.parametrize("pattern,m", [("2:4", 4), ("4:8", 8)])
def test_n_m_masks_are_valid(mlp, pattern, m):
    masks = wanda(mlp, [torch.randn(8, 16)], None, pattern=pattern)
    for name, mask in masks.items():
        assert (mask.reshape(mask.shape[0], -1, m).sum(-1) == m // 2).all()


def test_block_masks_are_whole_blocks(mlp):
    masks = wanda(mlp, [torch.randn(8, 16)], 0.5, pattern=(4, 4))
    for mask in masks.values():
        per_block = mask.reshape(mask.shape[0] // 4, 4, -1, 4).sum(dim=(1, 3))
        assert ((per_block == 0) | (per_block == 16)).all()


def test_later_layers_are_calibrated_on_the_pruned_earlier_layers():
    torch.manual_seed(0)
    model = MLP((16, 32, 16))
    dense = MLP((16, 32, 16))
    dense.load_state_dict(model.state_dict())
    x = torch.randn(64, 16)
    masks = wanda(model, [x[:32], x[32:]], 0.5)
    first_mask = mask_from_scores(wanda_scores(dense.layers[0].weight, x.norm(dim=0)), 0.5, per_row=True)
    assert torch.equal(masks["layers.0"], first_mask)
    pruned_hidden = torch.relu(model.layers[0](x))  # layer 0 as pruned
    dense_hidden = torch.relu(dense.layers[0](x))
    expected = mask_from_scores(wanda_scores(dense.layers[1].weight, pruned_hidden.norm(dim=0)), 0.5, per_row=True)
    from_dense = mask_from_scores(wanda_scores(dense.layers[1].weight, dense_hidden.norm(dim=0)), 0.5, per_row=True)
    assert torch.equal(masks["layers.1"], expected)
    assert not torch.equal(masks["layers.1"], from_dense)  # the test tells the two apart
    one_pass = MLP((16, 32, 16))
    one_pass.load_state_dict(dense.state_dict())
    masks = wanda(one_pass, [x[:32], x[32:]], 0.5, sequential=False)
    assert torch.equal(masks["layers.0"], first_mask)
    assert torch.equal(masks["layers.1"], from_dense)


class Attention(nn.Module):
    """q, k, v read the same tensor; o reads their result; head runs last."""

    def __init__(self, width=8):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.head = nn.Linear(width, 2)
        self.head_calls = 0

    def forward(self, x):
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1)
        hidden = x + self.o(scores @ self.v(x))
        self.head_calls += 1
        return self.head(hidden)


def test_layers_reading_the_same_input_share_a_calibration_pass():
    torch.manual_seed(0)
    model = Attention()
    calib = [torch.randn(2, 5, 8) for _ in range(3)]
    groups, counts = execution_groups(model, {n: getattr(model, n) for n in "qkvo"}, calib)
    assert groups == [["q", "k", "v"], ["o"]]
    assert counts == {"q": 1, "k": 1, "v": 1, "o": 1}
    model.head_calls = 0
    masks = wanda(model, calib, 0.5, ignore=["head"])
    # One batch to find the order, then the q/k/v and o passes stop before the head runs.
    assert model.head_calls == 1
    assert list(masks) == ["q", "k", "v", "o"]
    assert masks.sparsity() == 0.5


def test_max_batches_caps_the_calibration():
    model = nn.Sequential(nn.Linear(4, 4))
    seen = []
    model[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    wanda(model, [torch.randn(n, 4) for n in (1, 2, 3, 4)], 0.5, max_batches=2)
    assert seen == [1, 1, 2]  # the order pass, then two batches


class FailsOnFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, fail):
        hidden = self.fc1(x)
        if fail:
            raise RuntimeError("this batch breaks the model after fc1")
        return self.fc2(hidden)


def test_a_batch_the_model_rejects_restores_the_model():
    torch.manual_seed(0)
    model = FailsOnFlag()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [(torch.randn(3, 4), False), (torch.randn(3, 4), True)]
    # fc1 is pruned first; the fc2 pass then fails on batch 1.
    with pytest.raises(ValueError, match="batch 1 could not be run.*breaks the model"):
        wanda(model, calib, 0.5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_wrong_shape_calibration_data_is_refused(mlp):
    with pytest.raises(ValueError, match="batch 0 could not be run"):
        wanda(mlp, [torch.randn(4, 7)], 0.5)


def test_convolutions_are_refused_by_name():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match="wanda .* prunes linear layers only; layer '0' is a Conv2d"):
        wanda(model, [torch.randn(1, 2, 4, 4)], 0.5, targets=(nn.Conv2d, nn.Linear))


def test_unreached_layers_and_one_shot_data_are_refused(mlp):
    mlp.unused = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="never reaches layer\\(s\\) \\['unused'\\]"):
        wanda(mlp, [torch.randn(2, 16)], 0.5)
    with pytest.raises(TypeError, match="must be re-iterable"):
        wanda(mlp, (torch.randn(2, 16) for _ in range(2)), 0.5, ignore=["unused"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.2), "sparsity must be in"),
    (dict(sparsity=None, pattern="2:3"), "multiple of 3"),
    (dict(sparsity=0.5, ignore=["*"]), "no prunable layers"),
])
def test_bad_arguments(mlp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        wanda(mlp, [torch.randn(2, 16)], **kwargs)
