"""int8_linear_static (W8A8 with one calibrated activation scale): the CPU kernels (AVX-512 VNNI,
AVX2, portable) against sparseq._ref, the reference against a hand computation, and bad input."""
from __future__ import annotations

import pytest
import torch

import sparseq
from sparseq import _ref, ops
from sparseq.formats import PackedInt8Weight

from .int8_helpers import (CPU_KERNEL_PATHS, FLOAT_DTYPES, FUSED_GELU_TOL, _assert_float_close, _gen, _int8, _packed,
                           select_cpu_kernel_path)

needs_ext = pytest.mark.skipif(not sparseq.HAS_EXT, reason=f"sparseq extension not built ({sparseq.EXT_ERROR})")


@pytest.fixture(params=CPU_KERNEL_PATHS + ("reference",))
def backend(request, monkeypatch):
    """The compiled CPU kernel on each path, and the reference (which runs without the extension)."""
    if request.param == "reference":
        return "reference"
    if not sparseq.HAS_EXT:
        pytest.skip(f"sparseq extension not built ({sparseq.EXT_ERROR})")
    select_cpu_kernel_path(monkeypatch, request.param)
    return "cpu"


def _scale(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)


def _run(backend, x, x_scale, w, bias, act_qmax):
    return ops.int8_linear_static(x, x_scale, w.packed, w.scale, w.rowsum, bias, act_qmax, backend=backend)


def test_reference_matches_a_hand_computation():
    # x_scale = 0.25: x * 4 lands on integers and .5 ties (half to even); 100 * 4 clamps to 127.
    x = torch.tensor([[0.125, -0.375, 1.0, 100.0], [0.0, 0.625, -100.0, 2.0]])
    q_expected = torch.tensor([[0, -2, 4, 127], [0, 2, -127, 8]])  # 0.5 -> 0, -1.5 -> -2, 2.5 -> 2
    q, row_scale = _ref.quantize_static(x, _scale(0.25), 127)
    assert q.tolist() == q_expected.tolist()
    assert row_scale.tolist() == [0.25, 0.25]
    w_int = torch.tensor([[1, 2, 3, 4], [-5, 6, -7, 8], [127, -127, 0, 1]], dtype=torch.int8)
    w_scale = torch.tensor([0.5, 2.0, 1.0])
    bias = torch.tensor([1.0, -1.0, 0.5])
    w = PackedInt8Weight.from_int8(w_int, w_scale)
    expected = (q_expected @ w_int.long().T).float() * 0.25 * w_scale + bias
    out = _ref.int8_linear_static(x, _scale(0.25), w.packed, w.scale, w.rowsum, bias, 127)
    assert torch.equal(out, expected)


SHAPES = [(1, 1, 1), (17, 3, 15), (2, 67, 33), (5, 257, 17), (17, 257, 40)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act_qmax", (63, 127))
def test_matches_reference(backend, m, k, n, dtype, act_qmax):
    gen = _gen(m * 131 + k * 7 + n)
    w = _packed(n, k, gen)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    if m > 2:
        x[1] = 0
    x_scale = _scale(0.02)  # ~|x| > 2.5 clips at qmax 127, ~1.3 at 63
    for bias in (None, torch.randn(n, generator=gen).to(dtype)):
        out = _run(backend, x, x_scale, w, bias, act_qmax)
        # The same fp32 steps in the same order: bit for bit, whatever the dtype.
        assert torch.equal(out, _ref.int8_linear_static(x, x_scale, w.packed, w.scale, w.rowsum, bias, act_qmax))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fused_gelu_matches_reference(backend, dtype):
    gen = _gen(5)
    w = _packed(33, 67, gen)
    x = (torch.randn(17, 67, generator=gen) * 3).to(dtype)
    bias = torch.randn(33, generator=gen)
    out = ops.int8_linear_static(x, _scale(0.02), w.packed, w.scale, w.rowsum, bias, 127, "gelu", backend=backend)
    ref = _ref.int8_linear_static(x, _scale(0.02), w.packed, w.scale, w.rowsum, bias, 127, "gelu")
    plain = _ref.int8_linear_static(x, _scale(0.02), w.packed, w.scale, w.rowsum, bias, 127)
    tol = FUSED_GELU_TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(ref.float(), torch.nn.functional.gelu(plain.float()), rtol=tol, atol=tol)


def test_many_rows_match_reference(backend):
    gen = _gen(9)
    x = torch.randn(4097, 13, generator=gen).to(torch.bfloat16)
    w = _packed(17, 13, gen)
    bias = torch.randn(17, generator=gen)
    for act_qmax in (63, 127):
        out = _run(backend, x, _scale(0.01), w, bias, act_qmax)
        assert torch.equal(out, _ref.int8_linear_static(x, _scale(0.01), w.packed, w.scale, w.rowsum, bias, act_qmax))


@pytest.mark.parametrize("act_qmax", (63, 127))
def test_integer_core_is_exact(backend, act_qmax):
    # x_scale = 1 and w_scale = 1: the output is the exact integer product of the clamped x.
    gen = _gen(4)
    m, k, n = 13, 203, 35
    x = torch.randint(-200, 201, (m, k), generator=gen)
    q = _int8((n, k), "no_min", gen)
    w = PackedInt8Weight.from_int8(q, torch.ones(n))
    out = _run(backend, x.float(), _scale(1.0), w, None, act_qmax)
    assert torch.equal(out, (x.clamp(-act_qmax, act_qmax) @ q.to(torch.int64).T).float())


@pytest.mark.parametrize("act_qmax", (63, 127))
def test_rounds_half_to_even_with_the_inverse_of_the_scale(backend, act_qmax):
    x = torch.tensor([[0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 1.75, 1000.0]])
    w = PackedInt8Weight.from_int8(torch.eye(8, dtype=torch.int8), torch.ones(8))
    out = _run(backend, x, _scale(0.5), w, None, act_qmax)  # inv = 2: ties at .5
    assert out.tolist() == [[0.0, 1.0, 1.0, 0.0, -1.0, -1.0, 2.0, act_qmax * 0.5]]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nonfinite_rows_and_unusable_scales_give_nan(backend, dtype):
    gen = _gen(6)
    w = _packed(9, 40, gen)
    x = torch.randn(4, 40, generator=gen).to(dtype)
    x[1, 7] = float("nan")
    x[2, 39] = float("inf")
    out = _run(backend, x, _scale(0.05), w, None, 127)
    assert out[1].isnan().all() and out[2].isnan().all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()
    for bad in (0.0, -0.1, float("inf"), float("nan"), 1e-45):  # 1e-45: 1/s overflows
        assert _run(backend, x, _scale(bad), w, None, 127).isnan().all(), bad


def test_matches_dynamic_when_the_scale_is_the_row_absmax(backend):
    # One row whose absmax is a power of two: the static scale absmax / 127 gives the same
    # quantization as the dynamic kernel's qmax / absmax (both exact there).
    x = torch.randn(1, 50, generator=_gen(3))
    x[0, 0] = 4.0
    x = x.clamp(-4, 4)
    w = _packed(11, 50, _gen(2))
    static = _run(backend, x, _scale(4.0 / 127), w, None, 127)
    dynamic = ops.int8_linear(x, w.packed, w.scale, w.rowsum, None, 127,
                              backend="reference" if backend == "reference" else "cpu")
    _assert_float_close(static, dynamic)


@needs_ext
def test_opcheck():
    gen = _gen(1)
    w = _packed(20, 37, gen)
    x = torch.randn(5, 37, generator=gen)
    bias = torch.randn(20, generator=gen)
    for act_qmax in (63, 127):
        torch.library.opcheck(torch.ops.sparseq.int8_linear_static.default,
                              (x, _scale(0.03), w.packed, w.scale, w.rowsum, bias, act_qmax))
    torch.library.opcheck(torch.ops.sparseq.int8_linear_static.default,
                          (x, _scale(0.03), w.packed, w.scale, w.rowsum, None, 127))
    torch.library.opcheck(torch.ops.sparseq.int8_linear_static.default,
                          (x, _scale(0.03), w.packed, w.scale, w.rowsum, bias, 127, "gelu"))


def _bad_cases(x, w, bias):
    return [
        (dict(x_scale=torch.tensor(0.1)), "x_scale must be a float32 tensor of shape"),
        (dict(x_scale=torch.tensor([0.1, 0.2])), "x_scale must be a float32 tensor of shape"),
        (dict(x_scale=torch.tensor([0.1], dtype=torch.float64)), "x_scale must be a float32 tensor of shape"),
        (dict(x=x.double()), "x must be float32, bfloat16 or float16"),
        (dict(w_packed=w.packed[:1].contiguous()), "w_packed"),
        (dict(bias=bias[:3]), "bias must be"),
        (dict(act_qmax=100), "act_qmax must be 127"),
    ]


def _good_and_bad_args():
    gen = _gen(1)
    w = _packed(20, 37, gen)
    x, bias = torch.randn(5, 37, generator=gen), torch.randn(20, generator=gen)
    good = dict(x=x, x_scale=_scale(0.1), w_packed=w.packed, w_scale=w.scale, w_rowsum=w.rowsum, bias=bias,
                act_qmax=127)
    return good, _bad_cases(x, w, bias)


def test_bad_inputs_raise_clear_errors_at_the_door():
    good, bad_cases = _good_and_bad_args()
    for change, msg in bad_cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            ops.int8_linear_static(**{**good, **change})
    with pytest.raises(ValueError, match="no Triton kernel"):
        ops.int8_linear_static(**good, backend="triton")
    with pytest.raises(ValueError, match="x_scale is on"):
        ops.int8_linear_static(**{**good, "x_scale": _scale(0.1).to("meta")})


@needs_ext
def test_bad_inputs_raise_clear_errors_in_the_kernel():
    good, bad_cases = _good_and_bad_args()
    for change, msg in bad_cases:
        with pytest.raises(RuntimeError, match=msg.split(" tensor")[0]):
            torch.ops.sparseq.int8_linear_static(*{**good, **change}.values())


def _cuda_kernels_available() -> bool:
    if not (sparseq.HAS_EXT and torch.cuda.is_available()):
        return False
    return bool(sparseq._C.with_cuda) and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_kernels_available(), reason="needs a CUDA GPU (sm_80+) and sparseq built with CUDA")
class TestCuda:
    @pytest.mark.parametrize("m,k,n", [(1, 1, 17), (17, 3, 15), (4097, 67, 33), (5, 257, 40), (130, 4096, 64)])
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
    @pytest.mark.parametrize("act_qmax", (63, 127))
    def test_matches_reference(self, m, k, n, dtype, act_qmax):
        gen = _gen(m + k + n)
        w = _packed(n, k, gen)
        x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
        x[0, 0] = float("nan") if m > 1 else x[0, 0]
        for bias in (None, torch.randn(n, generator=gen)):
            ref = _ref.int8_linear_static(x, _scale(0.02), w.packed, w.scale, w.rowsum, bias, act_qmax)
            out = ops.int8_linear_static(x.cuda(), _scale(0.02).cuda(), w.packed.cuda(), w.scale.cuda(),
                                         w.rowsum.cuda(), None if bias is None else bias.cuda(), act_qmax,
                                         backend="cuda")
            # Same fp32 steps (the GPU epilogue may round once more to the output dtype).
            rtol = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
            torch.testing.assert_close(out.cpu(), ref, rtol=rtol, atol=1e-6, equal_nan=True)

    def test_unusable_scale_gives_nan_without_a_host_sync(self):
        w = _packed(9, 40, _gen(1))
        x = torch.randn(3, 40, device="cuda")
        for bad in (0.0, -1.0, float("inf"), 1e-45):
            out = ops.int8_linear_static(x, _scale(bad).cuda(), w.packed.cuda(), w.scale.cuda(), w.rowsum.cuda(),
                                         None, 127, backend="cuda")
            assert out.isnan().all()
