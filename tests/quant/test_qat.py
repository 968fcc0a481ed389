"""QAT: the fake quantizers reproduce the int8 layers' numerics, gradients flow, models convert."""
import copy

import pytest
import torch
import torch.nn as nn

from sparseq import _ref
from sparseq.formats import PackedInt8Weight, pow2_ceil
from sparseq.nn import Int8Linear, Int8StaticLinear, Int8WeightOnlyLinear
from sparseq.quant import EmaAbsMaxObserver, QATLinear, calibrate, prepare_qat, quantize_, sqnr_db
from sparseq.quant.qat import fake_quantize_per_row, fake_quantize_per_tensor, fake_quantize_weight


def weight_with_awkward_rows():
    torch.manual_seed(0)
    weight = torch.randn(24, 40)
    weight[3] = 0.0  # all-zero channel: scale 1, q 0
    weight[5] *= 1e-6  # tiny channel
    weight[7, 11] = 50.0  # one outlier in a channel
    return weight


def test_fake_quant_weight_is_bit_for_bit_the_packed_int8_weight():
    weight = weight_with_awkward_rows()
    assert torch.equal(fake_quantize_weight(weight), PackedInt8Weight.pack(weight).unpack())


@pytest.mark.parametrize("qmax", [127, 63])
def test_fake_quant_input_is_the_kernels_activation_quantizer(qmax):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 40) * torch.logspace(-3, 2, 40)
    x[0, 1] = 0.0
    q, scale = _ref.quantize_per_row(x.reshape(10, 40), qmax)
    fake = fake_quantize_per_row(x, qmax)
    assert fake.shape == x.shape
    assert torch.equal(fake.reshape(10, 40), q.float() * scale[:, None])


@pytest.mark.parametrize("scheme,act_bits,layer_cls", [("w8a8", 8, Int8Linear), ("w8a8", 7, Int8Linear),
                                                       ("w8a8", "auto", Int8Linear),
                                                       ("w8a16", "auto", Int8WeightOnlyLinear)])
def test_fake_quant_forward_equals_the_int8_layer(scheme, act_bits, layer_cls):
    linear = nn.Linear(40, 24)
    with torch.no_grad():
        linear.weight.copy_(weight_with_awkward_rows())
    qat = QATLinear.from_linear(linear, scheme, act_bits=act_bits)
    real = layer_cls.from_dense(qat) if layer_cls is Int8WeightOnlyLinear else \
        layer_cls.from_dense(qat, act_bits=act_bits)
    torch.manual_seed(2)
    x = torch.randn(3, 7, 40) * 2
    with torch.no_grad():
        fake_out, real_out, float_out = qat(x), real(x), linear(x)
    rounding = (fake_out - real_out).abs().max().item()
    quantization = (float_out - real_out).abs().max().item()
    # Same integers on both sides: only fp32 summation order differs, far below quantization noise.
    assert rounding <= 1e-5 * real_out.abs().max().item()
    assert rounding < 1e-3 * quantization


def test_power_of_two_scales():
    scales = torch.tensor([0.3, 0.5, 1.0, 3.0, 1.5 * 2.0 ** -20])
    assert torch.equal(pow2_ceil(scales), torch.tensor([0.5, 0.5, 1.0, 4.0, 2.0 ** -19]))
    weight = weight_with_awkward_rows()
    fake = fake_quantize_weight(weight, pow2_scales=True)
    step = pow2_ceil(PackedInt8Weight.pack(weight).scale)[:, None]
    codes = fake / step
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 127
    assert ((fake - weight).abs() <= step / 2).all()


def test_static_observer_keeps_a_running_absmax():
    observer = EmaAbsMaxObserver(decay=0.9)
    with pytest.raises(RuntimeError, match="seen no data"):
        observer.scale(127)
    observer.observe(torch.tensor([[1.0, -2.0]]))
    observer.observe(torch.tensor([[4.0, float("nan")]]))  # non-finite values do not count
    assert observer.absmax.item() == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert observer.scale(127) == pytest.approx(2.2 / 127)
    assert EmaAbsMaxObserver(pow2_scales=True).load_state_dict(observer.state_dict()) is not None
    pow2 = EmaAbsMaxObserver(decay=0.9, pow2_scales=True)
    pow2.load_state_dict(observer.state_dict())
    assert pow2.scale(127) == 2.0 ** -5  # 2.2 / 127 = 0.0173 rounds up to 1/32


def test_static_fake_quant_clips_and_its_ste_passes_gradient_inside_the_range_only():
    x = torch.tensor([-3.0, -0.26, 0.0, 0.74, 1.0, 2.5], requires_grad=True)
    scale = torch.tensor(0.5)
    out = fake_quantize_per_tensor(x, scale, qmax=3)  # range [-1.5, 1.5]
    assert out.tolist() == [-1.5, -0.5, 0.0, 0.5, 1.0, 1.5]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_static_layer_observes_in_training_and_freezes_in_eval():
    layer = QATLinear.from_linear(nn.Linear(8, 4), "w8a8_static", act_bits=8)
    layer(torch.full((2, 8), 2.0))
    layer(torch.full((2, 8), 4.0))
    assert layer.act_observer.scale(127) == pytest.approx((0.9 * 2 + 0.1 * 4) / 127)
    layer.eval()
    x = torch.full((2, 8), 100.0)
    with torch.no_grad():
        out = layer(x)
        expected = nn.functional.linear(torch.full((2, 8), 2.2), layer.fake_quant_weight(), layer.bias)
    assert layer.act_observer.batches.item() == 2  # eval does not move the range
    torch.testing.assert_close(out, expected)  # 100 clipped to the observed 2.2


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def test_prepare_qat_swaps_linears_in_place_and_keeps_their_parameters():
    model = nn.ModuleDict({"mlp": mlp(0), "attn": nn.MultiheadAttention(8, 2)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    parameters = {name: p for name, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    assert prepare_qat(model, "w8a8", skip=["mlp.4"]) is model
    assert [type(model["mlp"][i]).__name__ for i in (0, 2, 4)] == ["QATLinear", "QATLinear", "Linear"]
    assert type(model["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert all(p is parameters[name] for name, p in model.named_parameters())
    assert model.load_state_dict(state) is not None and set(model.state_dict()) == set(state)
    model["mlp"](torch.randn(4, 8)).sum().backward()
    before = model["mlp"][0].weight.detach().clone()
    optimizer.step()  # the optimizer built before prepare_qat trains the QAT layers
    assert not torch.equal(before, model["mlp"][0].weight)
    first = model["mlp"][0]
    prepare_qat(model, "w8a8")  # QAT layers stay as they are; the skipped one is prepared now
    assert model["mlp"][0] is first and type(model["mlp"][4]) is QATLinear


def toy_regression(seed, count=256):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 8, generator=generator)
    y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] - 0.5 * x[:, 3:4].abs()
    return x, y


def train(model, x, y, steps, lr):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8_static", "w8a16"])
def test_qat_training_lowers_the_loss(scheme):
    model = prepare_qat(mlp(1), scheme, act_bits=7)
    x, y = toy_regression(0)
    losses = train(model, x, y, steps=60, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


CONVERTED = {"w8a8": Int8Linear, "w8a16": Int8WeightOnlyLinear, "w8a8_static": Int8StaticLinear}


@pytest.mark.parametrize("pow2_scales", [False, True])
@pytest.mark.parametrize("scheme", ["w8a8", "w8a16", "w8a8_static"])
def test_a_qat_model_converts_to_what_it_trained(scheme, pow2_scales):
    x, y = toy_regression(0)
    trained = mlp(2)
    train(trained, x, y, steps=100, lr=1e-2)
    # Defaults on both sides must agree (static: 8-bit; dynamic "auto": the CPU core's full-rate bits).
    options = {"act_bits": 7} if scheme == "w8a8" else {}
    qat = prepare_qat(copy.deepcopy(trained), scheme, pow2_scales=pow2_scales, **options)
    train(qat, x, y, steps=20, lr=1e-3)
    ptq = copy.deepcopy(trained)
    if scheme == "w8a8_static":
        calibrate(ptq, [x])
    quantize_(ptq, scheme, pow2_scales=pow2_scales, **options)
    x_test, _ = toy_regression(1)
    with torch.no_grad():
        qat.eval()
        fake_out = qat(x_test)
        # The static scheme reads each QAT layer's act_observer (its trained activation range).
        quantize_(qat, scheme, pow2_scales=pow2_scales, **options)
        assert type(qat[0]) is CONVERTED[scheme]
        qat_sqnr = sqnr_db(fake_out, qat(x_test))
        ptq_sqnr = sqnr_db(trained(x_test), ptq(x_test))
    # Per layer the two agree to fp32 rounding; across layers a rounding difference now and then
    # lands an input on the other side of a rounding boundary, one step off: still far closer
    # (measured about 64 vs 34 dB for w8a8, 139 vs 40 dB for w8a16).
    assert qat_sqnr > ptq_sqnr + 20


def test_bad_input_is_reported_clearly():
    with pytest.raises(ValueError, match="unknown QAT scheme 'int4'"):
        prepare_qat(mlp(0), "int4")
    with pytest.raises(ValueError, match="act_bits"):
        prepare_qat(mlp(0), act_bits=6)
    with pytest.raises(TypeError, match="targets must be nn.Linear classes"):
        prepare_qat(mlp(0), targets=(nn.Conv2d,))
    with pytest.raises(TypeError, match="expects an nn.Module"):
        prepare_qat("model")
    with pytest.raises(ValueError, match="cannot replace the model itself"):
        prepare_qat(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no layers to prepare"):
        prepare_qat(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="ema_decay"):
        prepare_qat(mlp(0), "w8a8_static", ema_decay=1.0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="not initialized yet"):
        prepare_qat(model)
    assert type(model[0]) is nn.Linear  # nothing swapped when a later layer fails


def test_static_fake_quant_rounds_exactly_like_the_static_kernel():
    scale = torch.tensor([0.1])  # not a power of two: x / s and x * (1/s) differ near some ties
    ties = (torch.arange(-130, 130, dtype=torch.float32) + 0.5) * scale
    up, down = torch.full_like(ties, float("inf")), torch.full_like(ties, float("-inf"))
    x = torch.cat([ties, torch.nextafter(ties, up), torch.nextafter(torch.nextafter(ties, up), up),
                   torch.nextafter(ties, down), torch.nextafter(torch.nextafter(ties, down), down)])
    assert bool(((x / scale).round() != (x * (1 / scale)).round()).any())  # the case is real
    q, row_scale = _ref.quantize_static(x.reshape(1, -1), scale, 127)
    expected = (q.float() * row_scale[:, None]).reshape(-1)
    assert torch.equal(fake_quantize_per_tensor(x, scale, 127), expected)


def test_calibrate_refuses_qat_layers_before_touching_any():
    model = prepare_qat(mlp(0), "w8a8_static")
    x, _ = toy_regression(0)
    with pytest.raises(ValueError, match="already carry a trained activation range"):
        calibrate(model, [x])
    assert all(isinstance(layer.act_observer, EmaAbsMaxObserver) for layer in model if isinstance(layer, QATLinear))
