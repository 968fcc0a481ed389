"""The static W8A8 layer and scheme: a hand computation, calibrate -> quantize_, errors."""
import copy

import pytest
import torch
import torch.nn as nn

from sparseq.nn import Int8StaticLinear
from sparseq.quant import calibrate, quantize_, sqnr_db


def exact_linear():
    """A Linear whose per-channel int8 quantization is exact: weight rows are small integers
    times a power of two, absmax 127 * scale."""
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[127, -3, 0, 5], [1, 2, -127, 64]]) * torch.tensor([[0.5], [0.25]]))
        linear.bias.copy_(torch.tensor([1.0, -2.0]))
    return linear


def test_static_layer_matches_a_hand_computation():
    layer = Int8StaticLinear.from_dense(exact_linear(), x_scale=0.5)
    x = torch.tensor([[1.0, -0.75, 0.25, 1000.0], [0.0, 2.0, -3.0, -0.5]])
    # x / 0.5 = [2, -1.5, 0.5, 2000] -> [2, -2, 0, 127]; [0, 4, -6, -1]
    qx = torch.tensor([[2.0, -2.0, 0.0, 127.0], [0.0, 4.0, -6.0, -1.0]])
    qw = torch.tensor([[127.0, -3.0, 0.0, 5.0], [1.0, 2.0, -127.0, 64.0]])
    expected = (qx @ qw.T) * 0.5 * torch.tensor([0.5, 0.25]) + torch.tensor([1.0, -2.0])
    assert torch.equal(layer(x), expected)
    assert layer(x.reshape(2, 1, 4)).shape == (2, 1, 2)


def test_static_layer_state_dict_and_dtype_moves():
    layer = Int8StaticLinear.from_dense(exact_linear(), x_scale=0.5)
    fresh = Int8StaticLinear(4, 2)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4)
    assert torch.equal(fresh(x), layer(x))
    assert fresh.half().x_scale.dtype == torch.float32
    assert "x_scale=0.5" in repr(layer)


def test_from_dense_reads_the_observer_for_its_qmax():
    linear = exact_linear()
    calibrate(nn.Sequential(linear), [torch.tensor([[6.3, -1.0, 0.0, 2.0]])])
    assert Int8StaticLinear.from_dense(linear).x_scale.item() == pytest.approx(6.3 / 127)
    assert Int8StaticLinear.from_dense(linear, act_bits=7).x_scale.item() == pytest.approx(6.3 / 63)


def test_from_dense_errors():
    with pytest.raises(ValueError, match="run sparseq.quant.calibrate first"):
        Int8StaticLinear.from_dense(nn.Linear(4, 2))
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e-320):
        with pytest.raises(ValueError, match="x_scale must be a positive finite"):
            Int8StaticLinear.from_dense(nn.Linear(4, 2), x_scale=bad)
    with pytest.raises(ValueError, match="act_bits"):
        Int8StaticLinear.from_dense(nn.Linear(4, 2), x_scale=1.0, act_bits="auto")
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        Int8StaticLinear.from_dense(nn.Conv1d(4, 2, 1), x_scale=1.0)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 4))


def data(n=4):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(8, 16, generator=gen) for _ in range(n)]


def test_calibrate_then_quantize_static():
    model, batches = net(), data()
    expected = torch.cat([model(b) for b in batches])
    calibrate(model, batches)
    scales = {name: m.act_observer.scale(127) for name, m in model.named_children() if isinstance(m, nn.Linear)}
    quantize_(model, "w8a8_static")
    for name, scale in scales.items():
        layer = getattr(model, name)
        assert isinstance(layer, Int8StaticLinear) and layer.x_scale.item() == pytest.approx(scale)
    assert sqnr_db(expected, torch.cat([model(b) for b in batches])) > 30


def test_quantize_static_without_observers_fails_before_any_swap():
    model = net()
    calibrate(model, data(), skip=["4"])
    with pytest.raises(ValueError, match="layer '4'.*run sparseq.quant.calibrate first"):
        quantize_(model, "w8a8_static")
    assert all(type(m) is nn.Linear for m in (model[0], model[2], model[4]))


def test_quantize_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="unknown quantization scheme 'w8a8_dynamic'"):
        quantize_(net(), "w8a8_dynamic")
