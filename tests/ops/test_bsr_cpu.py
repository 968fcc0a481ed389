"""CPU bsr_linear kernels against sparseq._ref, on both the AVX2 and the portable path."""
from __future__ import annotations

import itertools

import pytest
import torch

import sparseq
from sparseq import _ref
from sparseq.formats import BlockSparseWeight

if not sparseq.HAS_EXT:
    pytest.skip(f"sparseq extension not built ({sparseq.EXT_ERROR})", allow_module_level=True)

from .test_int8_cpu import kernel_path  # noqa: E402,F401  (fixture: runs a test on each CPU path)

ops = torch.ops.sparseq
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VALUE_KINDS = ("fp32", "bf16", "fp16", "int8")
VALUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
# Fast paths: (1,8) (4,4) (8,8) (16,16) (32,32) (4,1) (1,4) (2,4); the others take the generic ones.
BLOCKS = [(1, 1), (1, 8), (4, 4), (3, 5), (16, 16), (32, 32), (4, 1), (1, 4), (2, 4), (3, 4), (8, 8)]
SHAPES = [(17, 67), (33, 255), (5, 300)]  # (N, K): neither a multiple of any block
SPARSITIES = (0.0, 0.5, 0.9, 1.0)
MS = (1, 2, 7, 8, 17, 33)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _block_sparse(n: int, k: int, block, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Dense [n, k] weight whose zeros come in whole blocks; block row 1 is always empty."""
    bh, bw = block
    nb, kb = -(-n // bh), -(-k // bw)
    keep = torch.rand(nb, kb, generator=gen) >= sparsity
    if nb > 1:
        keep[1] = False
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    return torch.randn(n, k, generator=gen) * mask


def _pack(w: torch.Tensor, block, kind: str) -> BlockSparseWeight:
    return BlockSparseWeight.pack(w, block, dtype=VALUE_DTYPES[kind], int8=kind == "int8")


def _args(x, bsr: BlockSparseWeight, bias):
    return (x, bsr.block_row_ptr, bsr.block_col_idx, bsr.values, bsr.scale, bias, bsr.out_features)


def _assert_close_to_exact(out: torch.Tensor, x: torch.Tensor, bsr: BlockSparseWeight, bias) -> None:
    """Error against an fp64 result at most twice _ref's, plus one output ulp and fp32
    accumulation slack (the kernels sum in another order)."""
    w = bsr.unpack().double()
    exact = x.double() @ w.T + (0 if bias is None else bias.double())
    ref = _ref.bsr_linear(*_args(x, bsr, bias))
    err, ref_err = (out.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
    magnitude = (x.double().abs() @ w.abs().T).max().item()
    bound = 2 * ref_err + torch.finfo(x.dtype).eps * exact.abs().max().item() + 1e-5 * magnitude
    assert out.dtype == x.dtype and out.shape == exact.shape
    assert err <= bound, (err, ref_err, bound)


@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_linear_matches_reference(kernel_path, block, kind):
    gen = _gen(block[0] * 1000 + block[1] * 10 + VALUE_KINDS.index(kind))
    cases = itertools.product(SHAPES, SPARSITIES)
    for i, ((n, k), sparsity) in enumerate(cases):
        bsr = _pack(_block_sparse(n, k, block, sparsity, gen), block, kind)
        # Every row count, x dtype and bias choice comes round across the cases.
        for m in (MS[i % len(MS)], MS[(i + 3) % len(MS)]):
            x = torch.randn(m, k, generator=gen).to(FLOAT_DTYPES[(i + m) % 3])
            bias = torch.randn(n, generator=gen).to(x.dtype) if (i + m) % 2 else None
            _assert_close_to_exact(ops.bsr_linear(*_args(x, bsr, bias)), x, bsr, bias)


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", VALUE_KINDS)
def test_bsr_linear_every_dtype_pair(kernel_path, kind, x_dtype):
    gen = _gen(5)
    for block, m in (((4, 4), 3), ((1, 8), 16), ((16, 16), 1), ((3, 5), 9)):
        bsr = _pack(_block_sparse(40, 90, block, 0.5, gen), block, kind)
        x = torch.randn(m, 90, generator=gen).to(x_dtype)
        bias = torch.randn(40, generator=gen)
        _assert_close_to_exact(ops.bsr_linear(*_args(x, bsr, bias)), x, bsr, bias)


def test_bsr_linear_many_rows(kernel_path):
    gen = _gen(8)
    bsr = _pack(_block_sparse(33, 67, (4, 4), 0.5, gen), (4, 4), "int8")
    x = torch.randn(4097, 67, generator=gen).to(torch.bfloat16)
    bias = torch.randn(33, generator=gen)
    _assert_close_to_exact(ops.bsr_linear(*_args(x, bsr, bias)), x, bsr, bias)


def test_bsr_linear_all_blocks_empty_gives_bias(kernel_path):
    bsr = _pack(torch.zeros(9, 20), (4, 4), "fp32")
    assert bsr.nnz_blocks == 0
    for m in (1, 12):
        bias = torch.arange(9, dtype=torch.float32)
        out = ops.bsr_linear(*_args(torch.randn(m, 20), bsr, bias))
        assert torch.equal(out, bias.expand(m, 9))
        assert torch.equal(ops.bsr_linear(*_args(torch.randn(m, 20), bsr, None)), torch.zeros(m, 9))


def test_bsr_linear_empty_inputs(kernel_path):
    bsr = _pack(_block_sparse(9, 20, (4, 4), 0.5, _gen(1)), (4, 4), "fp32")
    assert ops.bsr_linear(*_args(torch.randn(0, 20), bsr, None)).shape == (0, 9)
    empty = _pack(torch.zeros(0, 20), (4, 4), "fp32")
    assert ops.bsr_linear(*_args(torch.randn(3, 20), empty, None)).shape == (3, 0)


# --------------------------------------------------------------------------- bad indices

def _corrupt(bsr: BlockSparseWeight, what: str):
    row_ptr, col_idx = bsr.block_row_ptr.clone(), bsr.block_col_idx.clone()
    kb = -(-bsr.in_features // bsr.block[1])
    if what == "col_too_big":
        col_idx[-1] = kb
    elif what == "col_huge":
        col_idx[0] = 2**31 - 1
    elif what == "col_negative":
        col_idx[0] = -1
    elif what == "ptr_decreasing":
        row_ptr[1], row_ptr[2] = row_ptr[2], row_ptr[1] - 1
    elif what == "ptr_past_nnz":
        row_ptr[-1] = col_idx.numel() + 1
    elif what == "ptr_negative":
        row_ptr[0] = -1
    return row_ptr, col_idx


BAD_INDICES = ["col_too_big", "col_huge", "col_negative", "ptr_decreasing", "ptr_past_nnz", "ptr_negative"]


@pytest.mark.parametrize("what", BAD_INDICES)
@pytest.mark.parametrize("block", [(4, 4), (1, 8), (3, 5)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_linear_bad_indices_raise(kernel_path, block, what):
    gen = _gen(3)
    w = _block_sparse(40, 67, block, 0.0, gen)
    for kind in ("fp32", "int8"):
        bsr = _pack(w, block, kind)
        row_ptr, col_idx = _corrupt(bsr, what)
        for m in (1, 5, 16):
            x = torch.randn(m, 67, generator=gen)
            with pytest.raises(RuntimeError, match="invalid BSR indices"):
                ops.bsr_linear(x, row_ptr, col_idx, bsr.values, bsr.scale, None, bsr.out_features)


def test_bsr_linear_bad_arguments_via_ops():
    gen = _gen(4)
    bsr = _pack(_block_sparse(12, 20, (4, 4), 0.5, gen), (4, 4), "int8")
    x = torch.randn(3, 20, generator=gen)
    good = dict(x=x, block_row_ptr=bsr.block_row_ptr, block_col_idx=bsr.block_col_idx, values=bsr.values,
                w_scale=bsr.scale, bias=None, out_features=12)

    def call(**changes):
        kw = {**good, **changes}
        out_features = kw.pop("out_features")
        return sparseq.ops.bsr_linear(*kw.values(), out_features=out_features, backend="cpu")

    call()
    with pytest.raises(TypeError):
        call(x=x.to(torch.int32))
    with pytest.raises(ValueError):
        call(x=x[None])
    with pytest.raises(ValueError):
        call(values=bsr.values[:, 0])
    with pytest.raises(ValueError):
        call(out_features=20)
    with pytest.raises((TypeError, ValueError)):
        call(w_scale=None)
    with pytest.raises((TypeError, ValueError)):
        call(values=bsr.values.float(), w_scale=bsr.scale)
    with pytest.raises((TypeError, ValueError)):
        call(block_row_ptr=bsr.block_row_ptr.long())
    with pytest.raises((TypeError, ValueError)):
        call(bias=torch.randn(5))
    with pytest.raises(ValueError):
        sparseq.ops.bsr_linear(x, bsr.block_row_ptr, bsr.block_col_idx, bsr.values, bsr.scale, None,
                               out_features=12, in_features=21)


def test_bsr_linear_bad_arguments_via_torch_ops():
    gen = _gen(4)
    bsr = _pack(_block_sparse(12, 20, (4, 4), 0.5, gen), (4, 4), "fp32")
    x = torch.randn(3, 20, generator=gen)
    with pytest.raises(RuntimeError, match="block_row_ptr"):
        ops.bsr_linear(x, bsr.block_row_ptr, bsr.block_col_idx, bsr.values, None, None, 16)
    with pytest.raises(RuntimeError, match="w_scale"):
        ops.bsr_linear(x, bsr.block_row_ptr, bsr.block_col_idx, bsr.values.to(torch.int8), None, None, 12)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.bsr_linear(x.double(), bsr.block_row_ptr, bsr.block_col_idx, bsr.values, None, None, 12)


# ------------------------------------------------------------------------ opcheck, compile

def test_opcheck():
    gen = _gen(6)
    for block, kind, m in (((4, 4), "fp32", 5), ((1, 8), "int8", 9), ((3, 5), "bf16", 2)):
        bsr = _pack(_block_sparse(20, 37, block, 0.5, gen), block, kind)
        x = torch.randn(m, 37, generator=gen)
        for bias in (None, torch.randn(20, generator=gen)):
            torch.library.opcheck(ops.bsr_linear.default, _args(x, bsr, bias))


def test_compile_fullgraph():
    gen = _gen(7)
    bsr = _pack(_block_sparse(24, 40, (4, 4), 0.5, gen), (4, 4), "int8")
    x = torch.randn(6, 40, generator=gen)

    def f(x):
        return torch.relu(sparseq.ops.bsr_linear(x, bsr.block_row_ptr, bsr.block_col_idx, bsr.values, bsr.scale,
                                                 None, out_features=24))

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))
