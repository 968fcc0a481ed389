"""CPU kernels of the three int8 ops against sparseq._ref, on every CPU path (AVX-512 VNNI, AVX2, portable)."""
from __future__ import annotations

import itertools

import pytest
import torch

import sparseq
from sparseq import _ref

from .int8_helpers import (CPU_KERNEL_PATHS, FLOAT_DTYPES, FUSED_GELU_TOL, _assert_float_close, _gen, _int8, _packed,
                           select_cpu_kernel_path)

if not sparseq.HAS_EXT:
    pytest.skip(f"sparseq extension not built ({sparseq.EXT_ERROR})", allow_module_level=True)

ops = torch.ops.sparseq


@pytest.fixture(params=CPU_KERNEL_PATHS)
def kernel_path(request, monkeypatch):
    """Runs the test once per CPU kernel path (see select_cpu_kernel_path)."""
    select_cpu_kernel_path(monkeypatch, request.param)
    return request.param


# ---------------------------------------------------------------------------------- int8_gemm

GEMM_SHAPES = [(m, k, n) for m, k, n in itertools.product((1, 2, 17), (1, 3, 4, 5, 67), (1, 15, 16, 17, 33))
               if (m + k + n) % 2 == 0 or k in (1, 67)]
VALUE_KINDS = ["random", "no_min", "all_min", "all_max", "extremes", "zeros"]


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_int8_gemm_shapes_random(kernel_path, m, k, n):
    gen = _gen(m * 10007 + k * 101 + n)
    a, b = _int8((m, k), "random", gen), _int8((n, k), "random", gen)
    assert torch.equal(ops.int8_gemm(a, b), _ref.int8_gemm(a, b))


@pytest.mark.parametrize("kind_a,kind_b", list(itertools.product(VALUE_KINDS, VALUE_KINDS)))
def test_int8_gemm_value_extremes(kernel_path, kind_a, kind_b):
    # -128 in b is where the sign trick wraps (corrected afterwards); -128 in a is |a| = 128.
    gen = _gen(7)
    a, b = _int8((19, 131), kind_a, gen), _int8((37, 131), kind_b, gen)
    assert torch.equal(ops.int8_gemm(a, b), _ref.int8_gemm(a, b))


def test_int8_gemm_sparse_min_values(kernel_path):
    # A few -128 on both sides, on either side more often, so the wrap correction sees sparse,
    # clustered and absent hits per column.
    gen = _gen(3)
    for more_in_a in (True, False):
        a, b = _int8((23, 261), "no_min", gen), _int8((29, 261), "no_min", gen)
        a.view(-1)[::7 if more_in_a else 41] = -128
        b.view(-1)[::41 if more_in_a else 7] = -128
        assert torch.equal(ops.int8_gemm(a, b), _ref.int8_gemm(a, b))


@pytest.mark.parametrize("a_sign", ["negative", "positive", "mixed"])
def test_int8_gemm_min_in_b_against_signed_a(kernel_path, a_sign):
    # b = -128 wraps under vpsignb only where a < 0: the correction must add exactly there, for
    # |a| up to 128, in columns of every position in a 16-column block and a ragged last group.
    gen = _gen(11)
    a = _int8((37, 70), "random", gen)
    if a_sign == "negative":
        a = -(a.to(torch.int16).abs().clamp(min=1)).to(torch.int8)
    elif a_sign == "positive":
        a = a.to(torch.int16).abs().clamp(max=127).to(torch.int8)
    b = _int8((45, 70), "no_min", gen)
    b[torch.rand(b.shape, generator=gen) < 0.1] = -128
    b[3] = -128
    assert torch.equal(ops.int8_gemm(a, b), _ref.int8_gemm(a, b))


def test_int8_gemm_many_rows(kernel_path):
    gen = _gen(4097)
    a, b = _int8((4097, 9), "random", gen), _int8((17, 9), "random", gen)
    assert torch.equal(ops.int8_gemm(a, b), _ref.int8_gemm(a, b))


# The AMX core's tiles: 16-row tiles in pairs (and a single one), 16-column blocks in pairs (and a
# single one), whole 64-value K steps plus a partial last step, several row chunks per thread.
@pytest.mark.parametrize("m,k,n", [(33, 300, 70), (130, 1000, 49), (600, 128, 40), (48, 64, 16)])
def test_int8_gemm_tile_shapes(kernel_path, m, k, n):
    gen = _gen(m + k + n)
    a, b = _int8((m, k), "random", gen), _int8((n, k), "random", gen)
    assert torch.equal(ops.int8_gemm(a, b), _ref.int8_gemm(a, b))
    x = torch.randn(m, k, generator=gen)
    pw = _packed(n, k, gen)
    out = ops.int8_linear(x, pw.packed, pw.scale, pw.rowsum, None, 127)
    _assert_float_close(out, _ref.int8_linear(x, pw.packed, pw.scale, pw.rowsum, None, 127))


def test_int8_gemm_large_k_accumulates_in_int32(kernel_path):
    # K = 4099 at full magnitude: every pair sum and the int32 total must stay exact (M = 21:
    # the AMX core too).
    a = torch.full((21, 4099), -128, dtype=torch.int8)
    b = torch.full((18, 4099), -128, dtype=torch.int8)
    b[::2] = 127
    assert torch.equal(ops.int8_gemm(a, b), _ref.int8_gemm(a, b))


def test_int8_gemm_empty(kernel_path):
    for m, k, n in ((0, 5, 3), (4, 0, 3), (4, 5, 0)):
        a, b = torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
        out = ops.int8_gemm(a, b)
        assert out.shape == (m, n) and out.dtype == torch.int32 and not out.any()


# -------------------------------------------------------------------------------- int8_linear

LINEAR_SHAPES = [(1, 1, 1), (2, 3, 15), (17, 67, 33), (3, 5, 16), (4, 4, 17), (6, 261, 40), (1, 4099, 17)]


@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act_qmax", (63, 127))
def test_int8_linear_matches_reference(kernel_path, m, k, n, dtype, act_qmax):
    gen = _gen(m * 31 + k * 7 + n)
    w = _packed(n, k, gen)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    if m > 2:
        x[1] = 0  # a zero row quantizes with scale 1
    for bias in (None, torch.randn(n, generator=gen).to(dtype)):
        out = ops.int8_linear(x, w.packed, w.scale, w.rowsum, bias, act_qmax)
        _assert_float_close(out, _ref.int8_linear(x, w.packed, w.scale, w.rowsum, bias, act_qmax))


@pytest.mark.parametrize("act_qmax", (63, 127))
def test_int8_linear_integer_core_is_exact(kernel_path, act_qmax):
    # x holds integers with |x| = qmax in every row, so x_scale = 1; with w_scale = 1 and no bias
    # the output is float(acc) itself, which must equal the exact int32 product.
    gen = _gen(11)
    m, k, n = 13, 203, 35
    x = torch.randint(-act_qmax, act_qmax + 1, (m, k), generator=gen)
    x[:, 5] = act_qmax
    x[::2, 9] = -act_qmax
    q = _int8((n, k), "no_min", gen)
    q[3] = 127
    q[4] = -127
    w = sparseq.PackedInt8Weight.from_int8(q, torch.ones(n))
    out = ops.int8_linear(x.float(), w.packed, w.scale, w.rowsum, None, act_qmax)
    assert torch.equal(out, (x.to(torch.int64) @ q.to(torch.int64).T).float())


@pytest.mark.parametrize("act_qmax", (63, 127))
def test_int8_linear_rounds_half_to_even(kernel_path, act_qmax):
    # absmax = qmax gives inv = 1, so these values land exactly on .5 ties.
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, float(act_qmax)]])
    w = sparseq.PackedInt8Weight.from_int8(torch.eye(8, dtype=torch.int8), torch.ones(8))
    out = ops.int8_linear(x, w.packed, w.scale, w.rowsum, None, act_qmax)
    assert out.tolist() == [[0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 4.0, float(act_qmax)]]


@pytest.mark.parametrize("act_qmax", (63, 127))
def test_int8_linear_extreme_weights(kernel_path, act_qmax):
    gen = _gen(5)
    x = torch.randn(9, 77, generator=gen)
    for kind in ("all_max", "all_min", "extremes", "zeros"):
        w = _packed(21, 77, gen, kind)
        out = ops.int8_linear(x, w.packed, w.scale, w.rowsum, None, act_qmax)
        _assert_float_close(out, _ref.int8_linear(x, w.packed, w.scale, w.rowsum, None, act_qmax))


def test_int8_linear_many_rows(kernel_path):
    gen = _gen(8)
    x = torch.randn(4097, 13, generator=gen).to(torch.bfloat16)
    w = _packed(17, 13, gen)
    bias = torch.randn(17, generator=gen)
    for act_qmax in (63, 127):
        out = ops.int8_linear(x, w.packed, w.scale, w.rowsum, bias, act_qmax)
        _assert_float_close(out, _ref.int8_linear(x, w.packed, w.scale, w.rowsum, bias, act_qmax))


# -------------------------------------------------------------------- int8_weight_only_linear

@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES + [(4, 67, 33), (13, 131, 17), (40, 64, 48)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_int8_weight_only_linear_matches_reference(kernel_path, m, k, n, dtype):
    gen = _gen(m * 17 + k * 3 + n)
    w = _packed(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    for bias in (None, torch.randn(n, generator=gen).to(dtype)):
        out = ops.int8_weight_only_linear(x, w.packed, w.scale, bias)
        exact = x.double() @ w.unpack().double().T + (0 if bias is None else bias.double())
        ref = _ref.int8_weight_only_linear(x, w.packed, w.scale, bias)
        # Float sums in another order: bound the error against an fp64 result (twice the
        # reference's error, plus one output ulp and fp32 accumulation slack).
        err, ref_err = (out.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
        magnitude = (x.double().abs() @ w.unpack().double().abs().T).max().item()
        bound = 2 * ref_err + torch.finfo(dtype).eps * exact.abs().max().item() + 1e-5 * magnitude
        assert out.dtype == dtype and out.shape == (m, n)
        assert err <= bound, (err, ref_err, bound)


@pytest.mark.parametrize("m,k,n", [(1, 4096, 48), (3, 131, 33), (2, 4, 17)])
def test_int8_weight_only_avx512_stream_equals_avx2(monkeypatch, m, k, n):
    # Below 4 rows the weight is streamed; the AVX-512 stream sums each lane's products in the
    # AVX2 stream's order, so the two give the same bits.
    gen = _gen(m + k + n)
    w = _packed(n, k, gen)
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    select_cpu_kernel_path(monkeypatch, "avx512")
    out_avx512 = ops.int8_weight_only_linear(x, w.packed, w.scale, bias)
    select_cpu_kernel_path(monkeypatch, "avx2")
    out_avx2 = ops.int8_weight_only_linear(x, w.packed, w.scale, bias)
    assert torch.equal(out_avx512, out_avx2)

# ------------------------------------------------------------------------- opcheck, bad input

def _sample_args():
    gen = _gen(1)
    w = _packed(20, 37, gen)
    x = torch.randn(5, 37, generator=gen)
    bias = torch.randn(20, generator=gen)
    a, b = _int8((5, 37), "random", gen), _int8((20, 37), "random", gen)
    return a, b, x, w, bias


def test_opcheck():
    a, b, x, w, bias = _sample_args()
    torch.library.opcheck(ops.int8_gemm.default, (a, b))
    for act_qmax in (63, 127):
        torch.library.opcheck(ops.int8_linear.default, (x, w.packed, w.scale, w.rowsum, bias, act_qmax))
    torch.library.opcheck(ops.int8_linear.default, (x, w.packed, w.scale, w.rowsum, None, 127))
    torch.library.opcheck(ops.int8_weight_only_linear.default, (x, w.packed, w.scale, bias))
    torch.library.opcheck(ops.int8_weight_only_linear.default, (x, w.packed, w.scale, None))


def test_int8_linear_weight_with_int8_min_stays_exact(kernel_path):
    # PackedInt8Weight never stores -128, but a packed tensor passed directly may: the 8-bit
    # sign-trick path detects it and recomputes exactly.
    gen = _gen(2)
    q = _int8((19, 45), "random", gen)
    q[0, 0] = -128
    w = sparseq.PackedInt8Weight.from_int8(q, torch.ones(19))
    x = torch.randn(6, 45, generator=gen)
    for act_qmax in (63, 127):
        out = ops.int8_linear(x, w.packed, w.scale, w.rowsum, None, act_qmax)
        _assert_float_close(out, _ref.int8_linear(x, w.packed, w.scale, w.rowsum, None, act_qmax))


def test_bad_inputs_raise_clear_errors():
    a, b, x, w, bias = _sample_args()
    bad_gemm = [
        ((a.float(), b), "a must be int8"),
        ((a, b.to(torch.int16)), "b must be int8"),
        ((a[0], b), "must be 2-D"),
        ((a.t().contiguous().t(), b), "a must be contiguous"),
        ((a, b[:, :36].contiguous()), "same K"),
    ]
    for args, msg in bad_gemm:
        with pytest.raises(RuntimeError, match=msg):
            ops.int8_gemm(*args)
    good = dict(x=x, w_packed=w.packed, w_scale=w.scale, w_rowsum=w.rowsum, bias=bias, act_qmax=127)
    bad_linear = [
        (dict(x=x.double()), "x must be float32, bfloat16 or float16"),
        (dict(x=x[:, :36]), "x must be contiguous"),
        (dict(x=x[:, :36].contiguous()), "does not match"),
        (dict(w_packed=w.packed.reshape(-1, 16, 4)), "w_packed must be"),
        (dict(w_packed=w.packed[:1].contiguous()), "does not match"),
        (dict(w_packed=w.packed.float()), "w_packed must be"),
        (dict(w_scale=w.scale.double()), "w_scale must be"),
        (dict(w_rowsum=w.rowsum.float()), "w_rowsum must be"),
        (dict(w_rowsum=w.rowsum[:3]), "w_rowsum must be"),
        (dict(bias=bias[:3]), "bias must be"),
        (dict(act_qmax=100), "act_qmax must be 127"),
    ]
    for change, msg in bad_linear:
        args = {**good, **change}
        with pytest.raises(RuntimeError, match=msg):
            ops.int8_linear(*args.values())
    for change, msg in bad_linear[:7] + [bad_linear[9]]:
        args = {**good, **change}
        with pytest.raises(RuntimeError, match=msg):
            ops.int8_weight_only_linear(args["x"], args["w_packed"], args["w_scale"], args["bias"])


# ------------------------------------------------------------------------- fused GELU epilogue

@pytest.mark.parametrize("m,k,n", [(1, 37, 20), (17, 67, 33), (4097, 40, 16)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act_qmax", (63, 127))
def test_int8_linear_fused_gelu_matches_reference(kernel_path, m, k, n, dtype, act_qmax):
    gen = _gen(m + k + n)
    w = _packed(n, k, gen)
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    bias = torch.randn(n, generator=gen)
    out = ops.int8_linear(x, w.packed, w.scale, w.rowsum, bias, act_qmax, "gelu")
    plain = _ref.int8_linear(x, w.packed, w.scale, w.rowsum, bias, act_qmax)
    ref = _ref.int8_linear(x, w.packed, w.scale, w.rowsum, bias, act_qmax, "gelu")
    assert out.dtype == dtype and out.shape == (m, n)
    tol = FUSED_GELU_TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert not torch.allclose(ref.float(), plain.float())  # the activation did something
    torch.testing.assert_close(ref.float(), torch.nn.functional.gelu(plain.float()), rtol=tol, atol=tol)


def test_fused_gelu_keeps_nan_and_saturates_large_values(kernel_path):
    w = sparseq.PackedInt8Weight.from_int8(torch.tensor([[1], [-1]], dtype=torch.int8), torch.ones(2))
    x = torch.tensor([[30.0], [float("nan")], [0.0]])
    out = ops.int8_linear(x, w.packed, w.scale, w.rowsum, None, 127, "gelu")
    assert out[0, 0] == pytest.approx(30.0, rel=1e-6) and out[0, 1] == 0.0
    assert torch.isnan(out[1]).all() and torch.equal(out[2], torch.zeros(2))


def test_opcheck_with_fused_gelu():
    a, b, x, w, bias = _sample_args()
    torch.library.opcheck(ops.int8_linear.default, (x, w.packed, w.scale, w.rowsum, bias, 127, "gelu"))


def test_unknown_fused_activation_is_refused():
    a, b, x, w, bias = _sample_args()
    with pytest.raises(RuntimeError, match='activation must be "none" or "gelu", got "relu"'):
        ops.int8_linear(x, w.packed, w.scale, w.rowsum, bias, 127, "relu")
    with pytest.raises(ValueError, match="activation must be"):
        sparseq.ops.int8_linear(x, w.packed, w.scale, w.rowsum, bias, 127, "relu")
    with pytest.raises(ValueError, match="activation must be"):
        _ref.int8_linear(x, w.packed, w.scale, w.rowsum, bias, 127, "tanh")
