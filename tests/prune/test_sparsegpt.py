"""SparseGPT: exact masks, and a smaller output error than magnitude and Wanda."""
import pytest
import torch
import torch.nn as nn

from sparseq.prune import magnitude, sparsegpt, wanda
from sparseq.prune.patterns import parse_pattern
from sparseq.prune.sparsegpt import HessianAccumulator, sparsegpt_prune

from .conftest import MLP


def correlated_inputs(rows, features, seed=0):
    """Inputs whose features are correlated and of very different scales, as in real models."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features ** 0.5
    scales = torch.logspace(-1, 1, features)[torch.randperm(features, generator=generator)]
    return (torch.randn(rows, features, generator=generator) @ mixing + 0.3
            * torch.randn(rows, features, generator=generator)) * scales


def output_error(layer, reference_weight, x):
    return float(((x @ layer.weight.detach().t()) - (x @ reference_weight.t())).norm())


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_output_error_is_below_wanda_and_magnitude(pattern, sparsity):
    torch.manual_seed(0)
    x = correlated_inputs(512, 64)
    calib = list(x.split(128))
    dense = nn.Sequential(nn.Linear(64, 32, bias=False))
    errors = {}
    for name, method in [("magnitude", lambda m: magnitude(m, sparsity, pattern=pattern)),
                         ("wanda", lambda m: wanda(m, calib, sparsity, pattern=pattern)),
                         ("sparsegpt", lambda m: sparsegpt(m, calib, sparsity, pattern=pattern))]:
        model = nn.Sequential(nn.Linear(64, 32, bias=False))
        model.load_state_dict(dense.state_dict())
        masks = method(model)
        assert masks.sparsity() == 0.5
        errors[name] = output_error(model[0], dense[0].weight.detach(), x)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_exact_sparsity_and_valid_patterns_on_a_model(mlp):
    calib = [torch.randn(16, 16) for _ in range(2)]
    masks = sparsegpt(mlp, calib, 0.6, blocksize=8)
    for name, mask in masks.items():
        assert int((~mask).sum()) == int(0.6 * mask.numel() + 0.5)
        assert (mlp.get_submodule(name).weight[~mask] == 0).all()
    masks = sparsegpt(mlp, calib, None, pattern="4:8")
    for mask in masks.values():
        assert (mask.reshape(mask.shape[0], -1, 8).sum(-1) == 4).all()


def test_block_pattern_zeroes_whole_blocks(mlp):
    masks = sparsegpt(mlp, [torch.randn(16, 16)], 0.5, pattern=(4, 4), blocksize=6)
    for name, mask in masks.items():
        per_block = mask.reshape(mask.shape[0] // 4, 4, -1, 4).sum(dim=(1, 3))
        assert ((per_block == 0) | (per_block == 16)).all()
        assert (mlp.get_submodule(name).weight[~mask] == 0).all()


def test_hessian_is_twice_the_mean_outer_product():
    x = torch.randn(2, 5, 3)
    accumulator = HessianAccumulator(3, torch.device("cpu"))
    accumulator.add(x[0])
    accumulator.add(x[1])
    rows = x.reshape(-1, 3)
    torch.testing.assert_close(accumulator.hessian, 2 * rows.t() @ rows / 10)
    assert accumulator.rows == 10


def test_zero_sparsity_leaves_the_weight_and_dead_inputs_are_pruned_first():
    torch.manual_seed(0)
    weight = torch.randn(4, 8)
    x = torch.randn(64, 8)
    x[:, [1, 6]] = 0.0  # inputs 1 and 6 are never active
    hessian = 2 * x.t() @ x / 64
    unchanged, keep = sparsegpt_prune(weight, hessian, 0.0, parse_pattern("unstructured"))
    torch.testing.assert_close(unchanged, weight)
    assert keep.all()
    pruned, keep = sparsegpt_prune(weight, hessian, 0.25, parse_pattern("unstructured"))
    assert torch.isfinite(pruned).all()
    expected = torch.ones(4, 8, dtype=torch.bool)
    expected[:, [1, 6]] = False
    assert torch.equal(keep, expected)
    # Removing inputs the data never uses changes nothing else on that data.
    torch.testing.assert_close(x @ pruned.t(), x @ weight.t())


def test_model_level_output_error_improves_over_magnitude():
    torch.manual_seed(0)
    dense = MLP((32, 64, 32, 8))
    x = correlated_inputs(256, 32, seed=1)
    calib = list(x.split(64))
    errors = {}
    for name, method in [("magnitude", lambda m: magnitude(m, 0.5, scope="layer")),
                         ("sparsegpt", lambda m: sparsegpt(m, calib, 0.5))]:
        model = MLP((32, 64, 32, 8))
        model.load_state_dict(dense.state_dict())
        method(model)
        errors[name] = float((model(x) - dense(x)).detach().norm())
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors


def test_a_batch_the_model_rejects_restores_the_model():
    from .test_wanda import FailsOnFlag
    torch.manual_seed(0)
    model = FailsOnFlag()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batch 1 could not be run"):
        sparsegpt(model, [(torch.randn(3, 4), False), (torch.randn(3, 4), True)], 0.5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sparsity=-0.1), ValueError, "sparsity must be in"),
    (dict(sparsity=None, pattern="2:5"), ValueError, "layer 'layers.0'.*multiple of 5"),
    (dict(sparsity=0.5, blocksize=0), ValueError, "blocksize must be a positive int"),
    (dict(sparsity=0.5, percdamp=0.0), ValueError, "percdamp must be positive"),
    (dict(sparsity=0.5, targets=(nn.Conv2d,)), ValueError, "no prunable layers"),
])
def test_bad_arguments(mlp, kwargs, error, match):
    with pytest.raises(error, match=match):
        sparsegpt(mlp, [torch.randn(2, 16)], **kwargs)


def test_wrong_shape_calibration_data_is_refused(mlp):
    with pytest.raises(ValueError, match="batch 0 could not be run"):
        sparsegpt(mlp, [torch.randn(4, 5)], 0.5)
