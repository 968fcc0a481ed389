"""Power-of-two scales: exact powers of two, nothing clips, every int8 scheme, and their cost."""
import math

import pytest
import torch
import torch.nn as nn

from sparseq.formats import PackedInt8Weight, pow2_ceil
from sparseq.nn import Int8StaticLinear
from sparseq.quant import calibrate, pow2_scale_cost, quantize_


def is_pow2(values: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(values)
    return bool((mantissa == 0.5).all())


def test_pow2_ceil():
    values = torch.tensor([1.0, 0.75, 0.5, 0.3, 3.0, 4.0, 1e-30, 2.0**-130])
    assert pow2_ceil(values).tolist() == [1.0, 1.0, 0.5, 0.5, 4.0, 4.0, 2.0**-99, 2.0**-130]


def test_pow2_weight_scales_are_powers_of_two_and_nothing_clips():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 50, generator=gen) * torch.logspace(-3, 2, 37)[:, None]
    packed = PackedInt8Weight.pack(weight, pow2_scales=True)
    assert is_pow2(packed.scale)
    free = PackedInt8Weight.pack(weight)
    assert ((packed.scale >= free.scale) & (packed.scale < 2 * free.scale)).all()
    q = packed.unpack_int8().float()
    # round-to-nearest error only: no weight was clamped
    assert ((q * packed.scale[:, None] - weight).abs() <= packed.scale[:, None] / 2).all()
    # the smallest such power: the largest code of each row uses at least half the range
    assert (q.abs().amax(dim=1) >= 64).all()


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=gen) * 3 for _ in range(3)]


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_static", "w8a16"])
def test_every_int8_scheme_takes_pow2_scales(scheme):
    m = calibrate(model(), batches())
    observer_scale = m[0].act_observer.scale(127)
    quantize_(m, scheme, pow2_scales=True)
    for layer in (m[0], m[2]):
        assert is_pow2(layer.w_scale)
    if scheme == "w8a8_static":
        x_scale = m[0].x_scale.item()
        assert is_pow2(m[0].x_scale) and observer_scale <= x_scale < 2 * observer_scale
        assert math.log2(x_scale) == math.ceil(math.log2(observer_scale))


def test_pow2_static_layer_from_a_given_scale():
    layer = Int8StaticLinear.from_dense(nn.Linear(4, 4), x_scale=0.3, pow2_scales=True)
    assert layer.x_scale.item() == 0.5


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_static"])
def test_pow2_cost_is_reported_beside_free_scales(scheme):
    m = calibrate(model(), batches())
    before = [p.clone() for p in m.parameters()]
    cost = pow2_scale_cost(m, batches(), scheme)
    assert set(cost) == {"free_db", "pow2_db", "cost_db"}
    assert cost["cost_db"] == pytest.approx(cost["free_db"] - cost["pow2_db"])
    # coarser grids (scales up to 2x larger) lose accuracy, but stay usable
    assert cost["free_db"] > cost["pow2_db"] > 20
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert type(m[0]) is nn.Linear
