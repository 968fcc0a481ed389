"""GradualPruner: the cubic schedule of Zhu & Gupta, held masks, monotone pruning."""
import pytest
import torch
import torch.nn as nn

from sparseq.prune import GradualPruner


def zhu_gupta(step, s_i, s_f, t0, n_dt):
    return s_f + (s_i - s_f) * (1 - (step - t0) / n_dt) ** 3


def test_schedule_values_match_the_formula(mlp):
    pruner = GradualPruner(mlp, 0.8, start_step=10, end_step=110, every=20, initial_sparsity=0.1)
    for step in (10, 30, 50, 70, 90):
        assert pruner.sparsity_at(step) == pytest.approx(zhu_gupta(step, 0.1, 0.8, 10, 100))
    assert pruner.sparsity_at(0) == 0.1
    assert pruner.sparsity_at(110) == pruner.sparsity_at(500) == 0.8
    assert pruner.sparsity_at(60) == pytest.approx(0.8 - 0.7 / 8)
    updates = [step for step in range(200) if pruner.is_update_step(step)]
    assert updates == [10, 30, 50, 70, 90, 110]


def test_training_reaches_each_scheduled_sparsity_and_holds_it(mlp):
    pruner = GradualPruner(mlp, 0.75, start_step=2, end_step=8, every=3)
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.05)
    pruner.attach(optimizer)
    x, y = torch.randn(32, 16), torch.randn(32, 8)
    reached = {}
    previous = {name: torch.ones_like(mask) for name, mask in pruner.masks.items()}
    for step in range(12):
        optimizer.zero_grad()
        nn.functional.mse_loss(mlp(x), y).backward()
        optimizer.step()
        sparsity = pruner.step()
        if sparsity is not None:
            reached[step] = sparsity
        for name, mask in pruner.masks.items():
            weight = mlp.get_submodule(name).weight
            assert (weight[~mask] == 0).all()
            assert not (previous[name] < mask).any()  # nothing pruned ever comes back
            previous[name] = mask.clone()
    assert sorted(reached) == [2, 5, 8]
    assert reached[5] == pytest.approx(zhu_gupta(5, 0.0, 0.75, 2, 6))
    for name, mask in pruner.masks.items():  # per layer (scope="layer"), exact
        assert int((~mask).sum()) == int(0.75 * mask.numel() + 0.5)


def test_n_m_ramps_inside_the_pattern_and_ends_valid(mlp):
    pruner = GradualPruner(mlp, None, start_step=0, end_step=4, every=2, pattern="2:4")
    assert pruner.step() == 0.0
    pruner.step()
    assert pruner.step() == pytest.approx(0.5 - 0.5 / 8)
    for mask in pruner.masks.values():
        groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert (groups >= 2).all()  # no group is past 2:4 on the way
    pruner.step()
    assert pruner.step() == 0.5
    for mask in pruner.masks.values():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()


def test_wanda_method_uses_calibration_data(mlp):
    calib = [torch.randn(8, 16)]
    pruner = GradualPruner(mlp, 0.5, start_step=0, end_step=0, every=1, method="wanda",
                           calib_data=calib)
    assert pruner.step() == 0.5
    for mask in pruner.masks.values():
        assert ((~mask).sum(dim=1) == mask.shape[1] // 2).all()  # per output row, as Wanda


@pytest.mark.parametrize("kwargs,match", [
    (dict(final_sparsity=1.0), "sparsity must be in"),
    (dict(final_sparsity=0.5, initial_sparsity=0.6), "above final_sparsity"),
    (dict(final_sparsity=0.5, end_step=-1), "end_step must be an int >= 5"),
    (dict(final_sparsity=0.5, every=0), "every must be an int >= 1"),
    (dict(final_sparsity=0.5, method="random"), "method must be one of"),
    (dict(final_sparsity=0.5, method="wanda"), "needs calib_data"),
    (dict(final_sparsity=0.7, pattern="2:4"), "fixes the sparsity at 0.5"),
    (dict(final_sparsity=0.5, ignore="*"), "no prunable layers"),
])
def test_bad_arguments(mlp, kwargs, match):
    arguments = dict(start_step=5, end_step=10, every=1)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GradualPruner(mlp, **arguments)
