"""CPU kernels of sparse_csr_linear and sparse24_linear against sparseq._ref, on both the AVX2 and
the portable path, every value dtype x every activation dtype."""
from __future__ import annotations

import pytest
import torch

import sparseq
from sparseq import _ref
from sparseq import ops as sq_ops
from sparseq.formats import Sparse24Weight, SparseCSRWeight

if not sparseq.HAS_EXT:
    pytest.skip(f"sparseq extension not built ({sparseq.EXT_ERROR})", allow_module_level=True)

from .test_int8_cpu import kernel_path  # noqa: E402,F401  (fixture: runs a test on both CPU paths)

ops = torch.ops.sparseq
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (values dtype, int8 codes)
VALUE_KINDS = [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False), (None, True)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unstructured(n: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen)
    w = w * (torch.rand(n, k, generator=gen) >= sparsity)
    if n > 2:
        w[1] = 0  # an empty row
    return w


def _two_four(n: int, k: int, gen: torch.Generator, extra_sparsity: float = 0.3) -> torch.Tensor:
    """Random 2:4 weight; some groups keep fewer than 2 nonzeros, and row 1 is empty."""
    groups = -(-k // 4)
    g = torch.randn(n, groups, 4, generator=gen)
    keep = torch.rand(n, groups, 4, generator=gen).topk(2, dim=2).indices
    g = g * torch.zeros_like(g, dtype=torch.bool).scatter_(2, keep, True)
    g = g * (torch.rand(n, groups, 4, generator=gen) >= extra_sparsity)
    w = g.view(n, groups * 4)[:, :k].contiguous()
    if n > 2:
        w[1] = 0
    return w


def _assert_matches_fp64(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                         bias: torch.Tensor | None) -> None:
    """Float sums in another order: the error against an fp64 result is bounded by twice the
    reference's, plus one output ulp and fp32 accumulation slack."""
    assert out.dtype == x.dtype and out.shape == ref.shape
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    if exact.numel() == 0:
        return
    err = (out.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    magnitude = (x.double().abs() @ w.double().abs().T).max().item()
    bound = 2 * ref_err + torch.finfo(x.dtype).eps * exact.abs().max().item() + 1e-5 * magnitude
    assert err <= bound, (err, ref_err, bound)


def _run_all_dtypes(pack, weight_args, kernel, ref_op, w: torch.Tensor, m: int, gen: torch.Generator) -> None:
    """Every values kind x every x dtype, with and without bias: kernel(x, *weight_args(packed),
    scale, bias) against ref_op with the same arguments."""
    n, k = w.shape
    x32 = torch.randn(m, k, generator=gen)
    bias32 = torch.randn(n, generator=gen)
    for value_dtype, int8 in VALUE_KINDS:
        packed = pack(w, dtype=value_dtype, int8=int8)
        dense = packed.unpack()
        for dtype in FLOAT_DTYPES:
            x = x32.to(dtype)
            for bias in (None, bias32.to(dtype)):
                args = weight_args(packed) + (packed.scale, bias)
                out = kernel(x, *args)
                _assert_matches_fp64(out, ref_op(x, *args), x, dense, bias)


def _csr_args(packed: SparseCSRWeight):
    return packed.seg_ptr, packed.col_offsets, packed.values


def _24_args(packed: Sparse24Weight):
    return packed.values, packed.meta

# (m, k, n, sparsity): odd shapes around the kernels' 8/16/32/64-row tiles, 256-column segments,
# 16-entry gathers and 4-group (16-column) steps.
CSR_SHAPES = [
    (1, 1, 1, 0.0), (1, 3, 7, 0.5), (2, 67, 9, 0.9), (7, 255, 13, 0.5), (8, 256, 17, 0.9),
    (17, 257, 11, 0.0), (33, 300, 5, 0.9), (1, 1000, 19, 0.0), (16, 1000, 3, 0.5), (24, 513, 9, 1.0),
    (1, 300, 9, 1.0), (3, 1000, 21, 0.97),
    (20, 2100, 13, 0.5), (40, 2100, 7, 0.0),  # denser rows: K blocks of 4 segments, the last partial
    (1, 530, 11, 0.3), (100, 600, 23, 0.7), (130, 257, 9, 0.9),  # AVX-512: gather tails, 64 + 32 + 8 rows
]


@pytest.mark.parametrize("m,k,n,sparsity", CSR_SHAPES)
def test_sparse_csr_linear_matches_reference(kernel_path, m, k, n, sparsity):
    gen = _gen(m * 131 + k * 7 + n)
    _run_all_dtypes(SparseCSRWeight.pack, _csr_args, ops.sparse_csr_linear, _ref.sparse_csr_linear,
                    _unstructured(n, k, sparsity, gen), m, gen)


SPARSE24_SHAPES = [
    (1, 1, 1), (1, 3, 7), (2, 67, 9), (3, 255, 13), (4, 256, 17), (5, 257, 11), (7, 300, 5),
    (8, 1000, 19), (17, 1000, 3), (33, 67, 9), (1, 12, 3), (4, 20, 5),
]


@pytest.mark.parametrize("m,k,n", SPARSE24_SHAPES)
def test_sparse24_linear_matches_reference(kernel_path, m, k, n):
    gen = _gen(m * 131 + k * 7 + n)
    _run_all_dtypes(Sparse24Weight.pack, _24_args, ops.sparse24_linear, _ref.sparse24_linear,
                    _two_four(n, k, gen), m, gen)


def test_sparse24_linear_dense_groups(kernel_path):
    # Every group full (2 of 4 nonzero) and every position pair represented.
    gen = _gen(3)
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    n, groups = 12, 64
    w = torch.zeros(n, groups, 4)
    for r in range(n):
        for g in range(groups):
            a, b = pairs[(r + g) % len(pairs)]
            w[r, g, a], w[r, g, b] = torch.randn(2, generator=gen)
    w = w.view(n, 4 * groups)
    packed = Sparse24Weight.pack(w)
    for m in (1, 4, 5, 16):
        x = torch.randn(m, 4 * groups, generator=gen)
        out = ops.sparse24_linear(x, packed.values, packed.meta, None, None)
        _assert_matches_fp64(out, _ref.sparse24_linear(x, packed.values, packed.meta), x, w, None)


@pytest.mark.parametrize("kind", ["csr", "24"])
def test_many_rows(kernel_path, kind):
    gen = _gen(4)
    m, k, n = 4097, 67, 19
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen)
    if kind == "csr":
        w = _unstructured(n, k, 0.7, gen)
        p = SparseCSRWeight.pack(w)
        out = ops.sparse_csr_linear(x, p.seg_ptr, p.col_offsets, p.values, None, bias)
        ref = _ref.sparse_csr_linear(x, p.seg_ptr, p.col_offsets, p.values, None, bias)
    else:
        w = _two_four(n, k, gen)
        p = Sparse24Weight.pack(w)
        out = ops.sparse24_linear(x, p.values, p.meta, None, bias)
        ref = _ref.sparse24_linear(x, p.values, p.meta, None, bias)
    _assert_matches_fp64(out, ref, x, w, bias)


@pytest.mark.parametrize("m", [1, 16, 40, 128, 200])
def test_layer_sized(kernel_path, m):
    # A 90%-sparse 1024 x 2048 layer (full segments, thread chunks) and its 2:4 counterpart; at
    # m >= 128 the AVX-512 kernels walk 128-row tiles in K blocks (200 = 128 + 64 + 8).
    gen = _gen(m)
    x = torch.randn(m, 1024, generator=gen)
    w = _unstructured(2048, 1024, 0.9, gen)
    p = SparseCSRWeight.pack(w, int8=True)
    out = ops.sparse_csr_linear(x, p.seg_ptr, p.col_offsets, p.values, p.scale, None)
    _assert_matches_fp64(out, _ref.sparse_csr_linear(x, p.seg_ptr, p.col_offsets, p.values, p.scale), x,
                         p.unpack(), None)
    w24 = _two_four(2048, 1024, gen)
    p24 = Sparse24Weight.pack(w24)
    out = ops.sparse24_linear(x, p24.values, p24.meta, None, None)
    _assert_matches_fp64(out, _ref.sparse24_linear(x, p24.values, p24.meta), x, w24, None)


def test_empty_shapes(kernel_path):
    w = _unstructured(5, 40, 0.5, _gen(0))
    p = SparseCSRWeight.pack(w)
    out = ops.sparse_csr_linear(torch.randn(0, 40), p.seg_ptr, p.col_offsets, p.values, None, None)
    assert out.shape == (0, 5)
    p0 = SparseCSRWeight.pack(torch.zeros(0, 40))
    assert ops.sparse_csr_linear(torch.randn(3, 40), p0.seg_ptr, p0.col_offsets, p0.values, None, None).shape == (3, 0)
    p24 = Sparse24Weight.pack(torch.zeros(0, 40))
    assert ops.sparse24_linear(torch.randn(3, 40), p24.values, p24.meta, None, None).shape == (3, 0)


# ----------------------------------------------------------------------------- malformed input

def _bad_seg_ptrs(p: SparseCSRWeight) -> dict[str, torch.Tensor]:
    bad = {}
    decreasing = p.seg_ptr.clone()
    decreasing[5] = decreasing[4] - 1
    bad["decreasing"] = decreasing
    past_end = p.seg_ptr.clone()
    past_end[-1] = p.nnz + 1
    bad["past nnz"] = past_end
    huge = p.seg_ptr.clone()
    huge[7:] = 2**31 - 1
    bad["huge"] = huge
    negative = p.seg_ptr.clone()
    negative[0] = -3
    bad["negative start"] = negative
    crowded = torch.zeros_like(p.seg_ptr)
    crowded[1:] = p.nnz  # every entry in the first segment: more than 256 there
    bad["over 256 in a segment"] = crowded
    last = p.seg_ptr.clone()
    last[-2] = last[-1] + 1  # the last segment of the last row, past a 16-segment step on wide rows
    bad["decreasing in the last segment"] = last
    return bad


@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("k", [600, 18 * 256 - 30])  # 3 segments a row, and more than one 16-segment step
def test_malformed_seg_ptr_raises(kernel_path, m, k):
    gen = _gen(6)
    p = SparseCSRWeight.pack(_unstructured(16, k, 0.0, gen))
    assert p.nnz > 256
    x = torch.randn(m, k, generator=gen)
    for name, seg_ptr in _bad_seg_ptrs(p).items():
        with pytest.raises(RuntimeError, match="malformed seg_ptr"):
            ops.sparse_csr_linear(x, seg_ptr, p.col_offsets, p.values, None, None)
        with pytest.raises(RuntimeError, match="malformed seg_ptr"):
            sq_ops.sparse_csr_linear(x, seg_ptr, p.col_offsets, p.values)


def test_bad_inputs_through_ops_raise_clear_errors():
    gen = _gen(7)
    w = _unstructured(9, 300, 0.5, gen)  # 2 segments per row
    p, q = SparseCSRWeight.pack(w), SparseCSRWeight.pack(w, int8=True)
    x = torch.randn(3, 300, generator=gen)
    csr_cases = [
        (dict(x=x.double()), TypeError),
        (dict(x=x[0]), ValueError),
        (dict(seg_ptr=p.seg_ptr.long()), ValueError),
        (dict(seg_ptr=p.seg_ptr[:-1]), ValueError),
        (dict(col_offsets=p.col_offsets.to(torch.int8)), ValueError),
        (dict(values=p.values[:-1]), ValueError),
        (dict(values=p.values.double()), TypeError),
        (dict(values=q.values), ValueError),  # int8 without w_scale
        (dict(w_scale=torch.ones(9)), ValueError),  # w_scale with float values
        (dict(bias=torch.ones(8)), ValueError),
    ]
    good = dict(x=x, seg_ptr=p.seg_ptr, col_offsets=p.col_offsets, values=p.values, w_scale=None, bias=None)
    for change, error in csr_cases:
        with pytest.raises(error):
            sq_ops.sparse_csr_linear(**{**good, **change})
    with pytest.raises(ValueError, match="in_features"):
        sq_ops.sparse_csr_linear(x, p.seg_ptr, p.col_offsets, p.values, in_features=301)

    p24 = Sparse24Weight.pack(_two_four(9, 300, gen))
    good24 = dict(x=x, values=p24.values, meta=p24.meta, w_scale=None, bias=None)
    cases24 = [
        (dict(x=x.to(torch.int32)), TypeError),
        (dict(values=p24.values[:, :-2].contiguous()), ValueError),
        (dict(meta=p24.meta.to(torch.int8)), ValueError),
        (dict(meta=p24.meta[:-1]), ValueError),
        (dict(values=p24.values.to(torch.int8)), ValueError),  # int8 without w_scale
        (dict(bias=torch.ones(9, dtype=torch.int32)), ValueError),
    ]
    for change, error in cases24:
        with pytest.raises(error):
            sq_ops.sparse24_linear(**{**good24, **change})


def test_bad_inputs_through_torch_ops_raise_runtime_errors():
    gen = _gen(8)
    p = SparseCSRWeight.pack(_unstructured(9, 300, 0.5, gen))
    x = torch.randn(3, 300, generator=gen)
    with pytest.raises(RuntimeError, match="seg_ptr has"):
        ops.sparse_csr_linear(x, p.seg_ptr[:-1], p.col_offsets, p.values, None, None)
    with pytest.raises(RuntimeError, match="int8 sparse values need w_scale"):
        ops.sparse_csr_linear(x, p.seg_ptr, p.col_offsets, p.values.to(torch.int8), None, None)
    p24 = Sparse24Weight.pack(_two_four(9, 300, gen))
    with pytest.raises(RuntimeError, match="2:4 meta must be"):
        ops.sparse24_linear(x, p24.values, p24.meta[:, :-1].contiguous(), None, None)


# ----------------------------------------------------------------------- opcheck, torch.compile

def test_opcheck():
    gen = _gen(9)
    x = torch.randn(5, 37, generator=gen)
    bias = torch.randn(11, generator=gen)
    w = _unstructured(11, 37, 0.6, gen)
    w24 = _two_four(11, 37, gen)
    for int8 in (False, True):
        p = SparseCSRWeight.pack(w, int8=int8)
        p24 = Sparse24Weight.pack(w24, int8=int8)
        for b in (None, bias):
            torch.library.opcheck(ops.sparse_csr_linear.default, (x, p.seg_ptr, p.col_offsets, p.values, p.scale, b))
            torch.library.opcheck(ops.sparse24_linear.default, (x, p24.values, p24.meta, p24.scale, b))


def test_torch_compile_fullgraph():
    gen = _gen(10)
    x = torch.randn(6, 70, generator=gen)
    p = SparseCSRWeight.pack(_unstructured(13, 70, 0.8, gen))
    p24 = Sparse24Weight.pack(_two_four(13, 70, gen))

    def f(x):
        y = sq_ops.sparse_csr_linear(x, p.seg_ptr, p.col_offsets, p.values)
        return y + sq_ops.sparse24_linear(x, p24.values, p24.meta)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))
