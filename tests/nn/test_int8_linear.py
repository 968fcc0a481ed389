import copy
import io

import pytest
import torch
import torch.nn as nn

import sparseq
import sparseq.ops
from sparseq.nn import Int8Linear, Int8WeightOnlyLinear
from sparseq.quant import sqnr_db


def gaussian_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    return linear


def gaussian_input(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# (layer factory, SQNR floor in dB against fp32 nn.Linear)
LAYERS = {
    "w8a8": (lambda lin, **kw: Int8Linear.from_dense(lin, act_bits=8, **kw), 30.0),
    "w8a7": (lambda lin, **kw: Int8Linear.from_dense(lin, act_bits=7, **kw), 30.0),
    "w8-weight-only": (lambda lin, **kw: Int8WeightOnlyLinear.from_dense(lin, **kw), 40.0),
}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
def test_accuracy_against_fp32_linear(kind, bias):
    make, floor = LAYERS[kind]
    linear = gaussian_linear(256, 320, bias=bias)
    layer = make(linear)
    x = gaussian_input(64, 256)
    assert (layer.bias is None) == (not bias)
    assert sqnr_db(linear(x), layer(x)) >= floor


def test_weight_only_is_more_accurate_than_w8a8():
    linear = gaussian_linear(256, 256)
    x = gaussian_input(64, 256)
    reference = linear(x)
    assert (sqnr_db(reference, Int8WeightOnlyLinear.from_dense(linear)(x))
            > sqnr_db(reference, Int8Linear.from_dense(linear)(x)))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("m", [1, 17])
def test_row_counts_match_the_reference_backend(kind, m):
    make, floor = LAYERS[kind]
    linear = gaussian_linear(200, 72)
    x = gaussian_input(m, 200)
    out = make(linear)(x)
    assert out.shape == (m, 72)
    assert sqnr_db(linear(x), out) >= floor
    # The default backend (compiled kernel when built) must agree with the pure-PyTorch contract.
    torch.testing.assert_close(out, make(linear, backend="reference")(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", LAYERS)
def test_leading_dims_are_flattened_and_restored(kind):
    make, _ = LAYERS[kind]
    layer = make(gaussian_linear(96, 40))
    x = gaussian_input(2, 3, 5, 96)
    out = layer(x)
    assert out.shape == (2, 3, 5, 40)
    assert torch.equal(out.reshape(30, 40), layer(x.reshape(30, 96)))


@pytest.mark.parametrize("kind", LAYERS)
def test_non_contiguous_input(kind):
    make, _ = LAYERS[kind]
    layer = make(gaussian_linear(64, 48))
    x = gaussian_input(64, 9).T  # [9, 64], not contiguous
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_dtype_follows_input(kind, dtype):
    make, floor = LAYERS[kind]
    linear = gaussian_linear(256, 128)
    x = gaussian_input(16, 256).to(dtype)
    out = make(linear)(x)
    assert out.dtype == dtype
    # bf16 output rounding alone costs ~50 dB, so the W8A8 floor holds for every dtype.
    assert sqnr_db(linear(x.float()), out) >= min(floor, 30.0)


@pytest.mark.parametrize("kind", LAYERS)
def test_casting_the_model_keeps_fp32_scales(kind):
    make, floor = LAYERS[kind]
    linear = gaussian_linear(128, 64)
    layer = make(linear)
    scale_before = layer.w_scale.clone()
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.w_scale.dtype == torch.float32 and layer.bias.dtype == torch.float32
    assert torch.equal(layer.w_scale, scale_before)
    x = gaussian_input(8, 128).half()
    assert layer(x).dtype == torch.float16


def test_buffers_follow_device_moves():
    layer = Int8Linear.from_dense(gaussian_linear(64, 32)).to("meta")
    assert {b.device.type for b in layer.buffers()} == {"meta"}
    assert {name for name, _ in layer.named_buffers()} == {"w_packed", "w_scale", "w_rowsum", "bias"}


@pytest.mark.parametrize("cls,kwargs", [(Int8Linear, {"act_bits": 7}), (Int8WeightOnlyLinear, {})])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip_into_fresh_skeleton(cls, kwargs, bias):
    layer = cls.from_dense(gaussian_linear(100, 33, bias=bias), **kwargs)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"w_packed", "w_scale", "w_rowsum"} | ({"bias"} if bias else set())

    fresh = cls(100, 33, bias=bias, **kwargs)
    fresh.load_state_dict(state)
    x = gaussian_input(7, 100)
    assert torch.equal(fresh(x), layer(x))


def test_skeleton_rejects_a_state_dict_of_another_shape():
    state = Int8Linear.from_dense(gaussian_linear(64, 32)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        Int8Linear(64, 48).load_state_dict(state)
    with pytest.raises(RuntimeError, match="bias"):
        Int8Linear(64, 32, bias=False).load_state_dict(state)


@pytest.mark.parametrize("cls", [Int8Linear, Int8WeightOnlyLinear])
def test_to_dense_recovers_the_weight_within_half_a_step(cls):
    linear = gaussian_linear(130, 50)
    layer = cls.from_dense(linear)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear) and dense.weight.shape == linear.weight.shape
    error = (dense.weight - linear.weight).abs().amax(dim=1)
    assert (error <= layer.w_scale * 0.5 * (1 + 1e-5)).all()
    assert torch.equal(dense.bias, linear.bias)
    x = gaussian_input(5, 130)
    # Same dequantized weight on both sides: only float summation order differs.
    torch.testing.assert_close(dense(x), Int8WeightOnlyLinear.from_dense(linear)(x), rtol=1e-4, atol=1e-4)


def test_extra_repr():
    layer = Int8Linear.from_dense(gaussian_linear(256, 128, bias=False), act_bits=7, backend="reference")
    text = repr(layer)
    packed_bytes = 8 * 64 * 16 * 4 + 128 * 4 + 128 * 4  # n16k4 int8 + fp32 scales + int32 row sums
    for part in ("in_features=256", "out_features=128", "bias=False", "act_bits=7",
                 "backend=reference", f"packed_bytes={packed_bytes}"):
        assert part in text, (part, text)
    assert "backend=auto" in repr(Int8WeightOnlyLinear.from_dense(gaussian_linear(8, 8)))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = nn.Sequential(Int8Linear.from_dense(gaussian_linear(64, 96, seed=2)), nn.GELU(),
                          Int8WeightOnlyLinear.from_dense(gaussian_linear(96, 32, seed=3)))
    x = gaussian_input(4, 6, 64)
    compiled = torch.compile(model, fullgraph=True)
    expected = model(x)
    out = compiled(x)
    assert out.shape == expected.shape == (4, 6, 32)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


class TestBadInputs:
    def test_from_dense_needs_a_linear(self):
        with pytest.raises(TypeError, match="nn.Linear"):
            Int8Linear.from_dense(nn.Conv1d(4, 4, 1))
        with pytest.raises(TypeError, match="nn.Linear"):
            Int8WeightOnlyLinear.from_dense(torch.randn(4, 4))

    def test_uninitialized_lazy_linear(self):
        with pytest.raises(ValueError, match="forward"):
            Int8Linear.from_dense(nn.LazyLinear(8))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_non_finite_weight(self, bad):
        linear = gaussian_linear(16, 8)
        with torch.no_grad():
            linear.weight[3, 5] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            Int8Linear.from_dense(linear)
        with pytest.raises(ValueError, match="NaN or Inf"):
            Int8WeightOnlyLinear.from_dense(linear)

    @pytest.mark.parametrize("cls", [Int8Linear, Int8WeightOnlyLinear])
    def test_wrong_last_dim(self, cls):
        layer = cls.from_dense(gaussian_linear(12, 8))
        for shape in [(3, 13), (2, 3, 4), (36,), ()]:
            with pytest.raises(ValueError, match="in_features=12"):
                layer(torch.randn(shape))

    @pytest.mark.parametrize("cls", [Int8Linear, Int8WeightOnlyLinear])
    @pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.bool])
    def test_integer_input(self, cls, dtype):
        layer = cls.from_dense(gaussian_linear(12, 8))
        with pytest.raises(TypeError, match="float"):
            layer(torch.zeros(2, 12, dtype=dtype))

    def test_float64_input_is_refused(self):
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            Int8Linear.from_dense(gaussian_linear(12, 8))(torch.zeros(2, 12, dtype=torch.float64))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="Tensor"):
            Int8Linear.from_dense(gaussian_linear(3, 2))([[1.0, 2.0, 3.0]])

    def test_bad_options(self):
        linear = gaussian_linear(12, 8)
        with pytest.raises(ValueError, match="act_bits"):
            Int8Linear.from_dense(linear, act_bits=4)
        with pytest.raises(ValueError, match="backend"):
            Int8Linear.from_dense(linear, backend="tpu")
        with pytest.raises(ValueError, match="positive"):
            Int8Linear(0, 8)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_goes_through_the_dequantized_weight(kind, dtype):
    make, _ = LAYERS[kind]
    layer = make(gaussian_linear(48, 24))
    x = gaussian_input(2, 5, 48).to(dtype).requires_grad_()
    grad_out = gaussian_input(2, 5, 24, seed=7).to(dtype)
    layer(x).backward(grad_out)
    assert x.grad.dtype == dtype
    expected = (grad_out.float() @ layer.to_dense().weight).to(dtype)
    torch.testing.assert_close(x.grad, expected)
    assert all(not b.requires_grad for b in layer.buffers())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("kind", LAYERS)
def test_cuda_layer_matches_cpu_layer(kind):
    make, floor = LAYERS[kind]
    linear = gaussian_linear(256, 96)
    layer = make(linear)
    x = gaussian_input(33, 256)
    on_gpu = copy.deepcopy(layer).to("cuda")
    assert {b.device.type for b in on_gpu.buffers()} == {"cuda"}
    out = on_gpu(x.cuda().bfloat16())
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
    assert sqnr_db(linear(x), out.float().cpu()) >= floor - 3  # bf16 input rounding costs a little
    torch.testing.assert_close(on_gpu(x.cuda()).cpu(), layer(x), rtol=1e-4, atol=1e-4)


def test_auto_act_bits_are_the_cpu_cores_full_rate_bits():
    linear = gaussian_linear(64, 48)
    auto = Int8Linear.from_dense(linear)
    vnni = sparseq.HAS_EXT and sparseq._C.cpu_features()["vnni_kernels_enabled"]
    cpu_bits = 8 if vnni else 7
    assert sparseq.ops.cpu_int8_full_rate_bits() == cpu_bits
    assert auto.act_bits == "auto" and auto.act_bits_for(torch.device("cpu")) == cpu_bits
    assert auto.act_bits_for(torch.device("cuda")) == 8
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(auto(x), Int8Linear.from_dense(linear, act_bits=cpu_bits)(x))
    assert "act_bits=auto" in repr(auto)
