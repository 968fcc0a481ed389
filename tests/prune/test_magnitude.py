"""Magnitude pruning and the Masks it returns."""
import pytest
import torch
import torch.nn as nn

import sparseq
from sparseq.prune import Masks, magnitude

from .conftest import MLP


def weights(model):
    return {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_layer_scope_reaches_the_exact_sparsity_in_every_layer(mlp):
    before = weights(mlp)
    masks = magnitude(mlp, 0.7, scope="layer")
    for name, layer in mlp.named_modules():
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach()
            expected_zeros = int(0.7 * w.numel() + 0.5)
            assert int((w == 0).sum()) == expected_zeros
            # The zeros are the smallest weights: every kept |w| >= every pruned |w|.
            original = before[name].abs()
            assert original[w != 0].min() >= original[w == 0].max()
            assert torch.equal(masks[name], w != 0)
            assert torch.equal(w[w != 0], before[name][w != 0])  # survivors untouched
    assert masks.sparsity() == pytest.approx(sum(int(0.7 * n + 0.5) for n in (512, 768, 192)) / 1472)


def test_global_scope_reaches_the_exact_total_and_ranks_across_layers(mlp):
    before = weights(mlp)
    masks = magnitude(mlp, 0.6)  # global is the default
    total = sum(w.numel() for w in before.values())
    assert sum(masks.zeros().values()) == int(0.6 * total + 0.5)
    all_before = torch.cat([w.abs().flatten() for w in before.values()])
    all_mask = torch.cat([masks[name].flatten() for name in before])
    assert all_before[all_mask].min() >= all_before[~all_mask].max()
    # The per-layer sparsities differ (the layers' scales differ) but sum to the total.
    assert len({round(n / masks[name].numel(), 3) for name, n in masks.zeros().items()}) > 1


@pytest.mark.parametrize("pattern,m", [("2:4", 4), ("4:8", 8)])
def test_n_m_pattern_is_valid_in_every_group_of_every_row(mlp, pattern, m):
    masks = magnitude(mlp, None, pattern=pattern)
    for name, layer in mlp.named_modules():
        if isinstance(layer, nn.Linear):
            nonzero = (layer.weight != 0).reshape(layer.out_features, -1, m).sum(-1)
            assert (nonzero <= m // 2).all() and torch.equal(masks[name].reshape(layer.out_features, -1, m).sum(-1),
                                                             torch.full_like(nonzero, m // 2))
    assert masks.sparsity() == 0.5


def test_block_pattern_zeroes_whole_blocks(mlp):
    magnitude(mlp, 0.5, scope="layer", pattern=(4, 8))
    for layer in mlp.layers:
        blocks = (layer.weight != 0).reshape(layer.out_features // 4, 4, -1, 8)
        per_block = blocks.sum(dim=(1, 3))
        assert ((per_block == 0) | (per_block == 32)).all()  # random weights: no stray zeros
        assert int((per_block == 0).sum()) == per_block.numel() // 2


def test_targets_and_ignore_choose_the_layers(mlp):
    masks = magnitude(mlp, 0.5, ignore=["layers.2"])
    assert list(masks) == ["layers.0", "layers.1"]
    assert int((mlp.layers[2].weight == 0).sum()) == 0
    conv_model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3))
    masks = magnitude(conv_model, None, pattern="2:4", targets=(nn.Conv2d,))
    assert list(masks) == ["0"]
    # The conv weight [4, 4, 3, 3] is pruned as [4, 36]: 2 of every 4 of its 36 inputs kept.
    assert ((conv_model[0].weight != 0).reshape(4, 9, 4).sum(-1) == 2).all()
    assert int((conv_model[2].weight == 0).sum()) == 0


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam])
def test_attached_masks_hold_zeros_through_steps_and_stop_after_detach(mlp, optimizer_cls):
    masks = magnitude(mlp, 0.8)
    optimizer = optimizer_cls(mlp.parameters(), lr=0.05)
    masks.attach(optimizer)
    assert masks.attached
    x, y = torch.randn(32, 16), torch.randn(32, 8)
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.mse_loss(mlp(x), y).backward()
        optimizer.step()
        for name, mask in masks.items():
            weight = mlp.get_submodule(name).weight
            assert (weight[~mask] == 0).all()
            assert (weight[mask] != 0).all()
    masks.detach()
    assert not masks.attached
    optimizer.zero_grad()
    nn.functional.mse_loss(mlp(x), y).backward()
    optimizer.step()
    assert (mlp.layers[0].weight[~masks["layers.0"]] != 0).any()  # the zeros now train
    masks.apply()
    assert (mlp.layers[0].weight[~masks["layers.0"]] == 0).all()


def test_report_is_a_table_with_a_total(mlp):
    masks = magnitude(mlp, 0.5, scope="layer")
    table = masks.report()
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "shape", "params", "zeros", "sparsity"]
    assert lines[2].split() == ["layers.0", "32x16", "512", "256", "50.00%"]
    assert lines[-1].split() == ["total", "1472", "736", "50.00%"]
    assert "3 layers" in repr(masks)


def test_masks_validate_shapes_and_optimizers(mlp):
    with pytest.raises(ValueError, match="mask for 'layers.0' has shape"):
        Masks(mlp, {"layers.0": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Masks(mlp, {}).attach("sgd")


def test_sparsify_consumes_a_magnitude_pruned_model_with_the_same_outputs(mlp):
    magnitude(mlp, 0.75, scope="layer")
    x = torch.randn(5, 16)
    expected = mlp(x)
    sparseq.sparsify_(mlp)
    assert not any(isinstance(m, nn.Linear) and type(m) is nn.Linear for m in mlp.layers)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sparsity=1.0), ValueError, "sparsity must be in"),
    (dict(sparsity=-0.5), ValueError, "sparsity must be in"),
    (dict(sparsity=0.5, pattern="5:3"), ValueError, "0 < N < M"),
    (dict(sparsity=0.5, pattern="diagonal"), ValueError, "unknown sparsity pattern"),
    (dict(sparsity=None, pattern="2:5"), ValueError, "layer 'layers.0'.*multiple of 5.*16 inputs"),
    (dict(sparsity=0.5, pattern=(16, 2)), ValueError, "layer 'layers.2': block \\(16, 2\\) is larger"),
    (dict(sparsity=0.5, scope="model"), ValueError, "scope must be one of"),
    (dict(sparsity=0.5, ignore=["layers.*"]), ValueError, "no prunable layers in MLP"),
    (dict(sparsity=0.5, targets=(nn.Conv2d,)), ValueError, "no prunable layers"),
    (dict(sparsity=0.5, targets=("Linear",)), TypeError, "targets must be nn.Module classes"),
])
def test_bad_input_is_refused_and_leaves_the_model_unchanged(mlp, kwargs, error, match):
    before = weights(mlp)
    with pytest.raises(error, match=match):
        magnitude(mlp, **kwargs)
    for name, w in weights(mlp).items():
        assert torch.equal(w, before[name])


def test_not_a_module_is_refused():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        magnitude([nn.Linear(2, 2)], 0.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_follow_the_model_to_another_device(mlp):
    masks = magnitude(mlp, 0.5)
    mlp.cuda()
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)
    masks.attach(optimizer)
    x = torch.randn(4, 16, device="cuda")
    mlp(x).sum().backward()
    optimizer.step()
    assert masks["layers.0"].device.type == "cuda"
    assert (mlp.layers[0].weight[~masks["layers.0"]] == 0).all()
