"""Triton int8 GEMM / W8A8 linear against sparseq._ref.

Runs on a CUDA GPU when there is one, else on CPU tensors in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported). References are computed on CPU.
"""
import itertools

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend is optional")

from sparseq import _ref, ops  # noqa: E402
from sparseq.triton import is_available  # noqa: E402
from sparseq.triton import int8_matmul as tm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MS, NS, KS = (1, 17, 33), (1, 16, 17, 40), (1, 5, 32, 67)
SHAPES = list(itertools.product(MS, NS, KS))
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _heuristic_tiles(monkeypatch):
    # On a GPU, autotuning every shape x dtype would spend minutes benchmarking; the tuned path and
    # every tuned config get their own tests below. (The interpreter has one config: no effect.)
    monkeypatch.setenv("SPARSEQ_TRITON_AUTOTUNE", "0")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randint8(shape, seed, low=-128, high=128):
    return torch.randint(low, high, shape, dtype=torch.int8, generator=_gen(seed))


def _weight(n, k, seed):
    w = _randint8((n, k), seed, -127, 128)
    scale = torch.rand(n, generator=_gen(seed + 1)) * 0.02 + 1e-3
    bias = torch.randn(n, generator=_gen(seed + 2))
    return w, scale, bias


def _assert_float_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    out = out.cpu()
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if tm.INTERPRET:
        # The interpreter runs the same fp32 steps as the reference: anything but equality is a bug
        # (this is what catches a truncating fp32 -> bf16 conversion).
        assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
        return
    # On the GPU the epilogue's multiply-add may be contracted into one FMA (one fp32 rounding
    # fewer), which can move the result by one ulp of the output dtype.
    eps = torch.finfo(ref.dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=eps,
                               atol=1e-6 * (1.0 + ref.float().abs().max().item()))


def test_is_available():
    assert is_available()


def _extreme_rows(t: torch.Tensor, first: int) -> torch.Tensor:
    # Rows cycle through `first`, the other extreme (127 <-> -128) and random values, so one GEMM
    # holds (-128)x(-128), 127x127 and (-128)x127 products (sums up to K * 16384 in magnitude).
    t = t.clone()
    t[0::3] = first
    t[1::3] = 127 if first == -128 else -128
    return t


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_gemm_exact(m, n, k):
    a = _randint8((m, k), 10 * m + k)
    b = _randint8((n, k), 10 * n + k + 1)
    for a_case, b_case in ((a, b), (_extreme_rows(a, -128), _extreme_rows(b, -128)),
                           (_extreme_rows(a, 127), _extreme_rows(b, -128))):
        out = tm.int8_gemm(a_case.to(DEVICE), b_case.to(DEVICE))
        assert out.dtype == torch.int32 and out.shape == (m, n)
        assert torch.equal(out.cpu(), _ref.int8_gemm(a_case, b_case))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("qmax", (127, 63))
def test_quantize_rows_bit_exact(dtype, qmax):
    x = torch.randn(33, 67, generator=_gen(3)) * 3
    x[5] = 0.0                                   # zero row: scale 1, q = 0
    x[6, :] = 1e-30                              # tiny row: the scale must not underflow to zero
    # Rows whose absmax equals qmax make inv exactly 1, so x.5 values are exact ties.
    ties = torch.arange(67, dtype=torch.float32) % 9 - 4.5
    x[7] = ties
    x[7, 0] = float(qmax)
    x[8] = -ties
    x[8, 3] = -float(qmax)
    x = x.to(dtype)
    q, scale = tm.quantize_rows(x.to(DEVICE), qmax)
    q_ref, scale_ref = _ref.quantize_per_row(x, qmax)
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(scale.cpu(), scale_ref)
    assert q[5].abs().max() == 0 and scale[5] == 1.0 / qmax
    # Half to even, not away from zero: -3.5 -> -4, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, and mirrored.
    assert q[7, [1, 5, 6, 7]].tolist() == [-4, 0, 2, 2]
    assert q[8, [1, 5, 6, 7]].tolist() == [4, 0, -2, -2]


@pytest.mark.parametrize("qmax", (127, 63))
def test_quantize_rows_nonfinite_rows(qmax):
    x = torch.randn(6, 67, generator=_gen(4))
    x[1, 3], x[2, 66], x[3, 0] = float("nan"), float("inf"), -float("inf")
    q, scale = tm.quantize_rows(x.to(DEVICE), qmax)
    q_ref, scale_ref = _ref.quantize_per_row(x, qmax)
    assert torch.equal(q.cpu(), q_ref) and not q_ref[1:4].any()
    assert torch.isnan(scale[1:4]).all() and torch.isnan(scale_ref[1:4]).all()
    assert torch.equal(scale.cpu()[[0, 4, 5]], scale_ref[[0, 4, 5]])


@pytest.mark.parametrize("m,n,k,qmax", [(*shape, (127, 63)[i % 2]) for i, shape in enumerate(SHAPES)])
def test_int8_linear_integer_path_exact(m, n, k, qmax):
    # Integer activations whose row absmax is qmax quantize to themselves with scale 1; with unit
    # weight scales the fp32 output is the int32 accumulator itself, so it must match exactly.
    x = torch.randint(-qmax, qmax + 1, (m, k), generator=_gen(m + n + k)).float()
    x[:, 0] = float(qmax)
    w, _, _ = _weight(n, k, 7 * n + k)
    out = tm.int8_linear(x.to(DEVICE), _ref.pack_n16k4(w).to(DEVICE),
                         torch.ones(n, device=DEVICE), None, qmax)
    assert torch.equal(out.cpu(), _ref.int8_gemm(x.to(torch.int8), w).float())


# Every (dtype, bias) pair meets every qmax on many shapes without the full cross product.
LINEAR_CASES = [(*shape, qmax, FLOAT_DTYPES[(i + j) % 3], (i + j + qmax) % 2 == 0)
                for i, shape in enumerate(SHAPES) for qmax in (127, 63) for j in (0, 1)]


@pytest.mark.parametrize("m,n,k,qmax,dtype,use_bias", LINEAR_CASES,
                         ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None)
def test_int8_linear_matches_reference(m, n, k, qmax, dtype, use_bias):
    w, w_scale, bias = _weight(n, k, 5 * n + k)
    packed = _ref.pack_n16k4(w)
    x = torch.randn(m, k, generator=_gen(m * k + n)) * 2
    if m > 1:
        x[m // 2] = 0.0  # a zero row gives exactly the bias
    x = x.to(dtype)
    b = bias if use_bias else None
    out = tm.int8_linear(x.to(DEVICE), packed.to(DEVICE), w_scale.to(DEVICE),
                         None if b is None else b.to(DEVICE), qmax)
    _assert_float_close(out, _ref.int8_linear(x, packed, w_scale, None, b, qmax))


def test_int8_linear_bias_in_low_precision():
    w, w_scale, bias = _weight(40, 67, 11)
    x = torch.randn(17, 67, generator=_gen(12)).bfloat16()
    packed = _ref.pack_n16k4(w)
    out = tm.int8_linear(x.to(DEVICE), packed.to(DEVICE), w_scale.to(DEVICE),
                         bias.bfloat16().to(DEVICE), 127)
    _assert_float_close(out, _ref.int8_linear(x, packed, w_scale, None, bias.bfloat16(), 127))


def test_padding_of_packed_weight_is_ignored():
    # Bytes past N and K in the packed tensor must not reach the output.
    w, w_scale, bias = _weight(17, 5, 13)
    packed = _ref.pack_n16k4(w)
    dirty = packed.clone()
    dirty[1, :, 1:, :] = 77   # rows 17..31 do not exist
    dirty[:, 1, :, 1:] = -99  # columns 5..7 do not exist
    assert torch.equal(_ref.unpack_n16k4(dirty, 17, 5), w)
    x = torch.randn(33, 5, generator=_gen(14))
    out = tm.int8_linear(x.to(DEVICE), dirty.to(DEVICE), w_scale.to(DEVICE), bias.to(DEVICE), 127)
    _assert_float_close(out, _ref.int8_linear(x, packed, w_scale, None, bias, 127))


@pytest.mark.parametrize("config", tm.configs(), ids=str)
def test_every_tuned_config_is_exact(config):
    # Whichever config the autotuner picks must be correct: run each one on shapes that are not
    # multiples of any tile (on the interpreter the list holds its single config).
    m, n, k = (33, 40, 67) if tm.INTERPRET else (300, 272, 1000)
    a, b = _randint8((m, k), 21), _randint8((n, k), 22)
    out = tm.int8_gemm(a.to(DEVICE), b.to(DEVICE), config=config)
    assert torch.equal(out.cpu(), _ref.int8_gemm(a, b))
    w, w_scale, bias = _weight(n, k, 23)
    packed = _ref.pack_n16k4(w)
    x = torch.randn(m, k, generator=_gen(24)).bfloat16()
    out = tm.int8_linear(x.to(DEVICE), packed.to(DEVICE), w_scale.to(DEVICE), bias.to(DEVICE), 127,
                         config=config)
    _assert_float_close(out, _ref.int8_linear(x, packed, w_scale, None, bias, 127))


def test_autotuned_path_through_ops(monkeypatch):
    monkeypatch.setenv("SPARSEQ_TRITON_AUTOTUNE", "1")
    a, b = _randint8((17, 67), 31), _randint8((40, 67), 32)
    out = ops.int8_gemm(a.to(DEVICE), b.to(DEVICE), backend="triton")
    assert torch.equal(out.cpu(), _ref.int8_gemm(a, b))
    w, w_scale, bias = _weight(40, 67, 33)
    packed = _ref.pack_n16k4(w)
    rowsum = w.to(torch.int32).sum(dim=1).to(torch.int32)
    x = torch.randn(17, 67, generator=_gen(34)).half()
    out = ops.int8_linear(x.to(DEVICE), packed.to(DEVICE), w_scale.to(DEVICE), rowsum.to(DEVICE),
                          bias.to(DEVICE), 63, backend="triton")
    _assert_float_close(out, _ref.int8_linear(x, packed, w_scale, rowsum, bias, 63))


def test_empty_shapes():
    a, b = torch.zeros(0, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8)
    assert tm.int8_gemm(a.to(DEVICE), b.to(DEVICE)).shape == (0, 3)
    x = torch.zeros(0, 8)
    out = tm.int8_linear(x.to(DEVICE), _ref.pack_n16k4(b).to(DEVICE), torch.ones(3, device=DEVICE), None, 127)
    assert out.shape == (0, 3) and out.dtype == torch.float32


def test_rejects_tensors_it_cannot_run_on():
    a = torch.zeros(2, 4, dtype=torch.int8, device="meta")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        tm.int8_gemm(a, a)
