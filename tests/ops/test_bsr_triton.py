"""Triton block-sparse linear (sparseq.triton.bsr_matmul) against sparseq._ref.bsr_linear.

Runs on a CUDA GPU when there is one, else on CPU tensors in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported); the interpreter is slow, so shapes stay small.
One weight mixes block rows of every density (all blocks, half, a tenth, none), so each call
covers 0 / 50 / 90 / 100 % sparsity, and N, K are not multiples of the block.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton backend is optional")

from sparseq import _ref, ops  # noqa: E402
from sparseq.formats import BlockSparseWeight  # noqa: E402
from sparseq.triton import bsr_matmul as bm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VALUE_DTYPES = FLOAT_DTYPES + (torch.int8,)
# Fraction of stored blocks in block row i: cycles through dense, half, a tenth, empty.
ROW_DENSITIES = (1.0, 0.5, 0.1, 0.0)


def _ids(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None


@pytest.fixture(autouse=True)
def _heuristic_tiles(monkeypatch):
    # On a GPU, autotuning every case would spend minutes benchmarking; the tuned path and every
    # tuned config get their own tests below. (The interpreter has one config: no effect.)
    monkeypatch.setenv("SPARSEQ_TRITON_AUTOTUNE", "0")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _block_sparse_weight(n, k, block, seed, densities=ROW_DENSITIES):
    """Dense W [N, K] whose block row i keeps a densities[i % 4] fraction of its blocks (at least
    one unless the density is 0); kept blocks also hold scattered zeros."""
    bh, bw = block
    nb, kb = -(-n // bh), -(-k // bw)
    gen = _gen(seed)
    keep = torch.zeros(nb, kb, dtype=torch.bool)
    for i in range(nb):
        count = round(densities[i % len(densities)] * kb)
        if densities[i % len(densities)] > 0:
            count = max(count, 1)
        keep[i, torch.randperm(kb, generator=gen)[:count]] = True
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) > 0.2)
    return w * mask


def _pack(w, block, value_dtype):
    if value_dtype == torch.int8:
        return BlockSparseWeight.pack(w, block, int8=True)
    return BlockSparseWeight.pack(w, block, dtype=value_dtype)


def _run(p, x, bias, **kwargs):
    return bm.bsr_linear(x.to(DEVICE), p.block_row_ptr.to(DEVICE), p.block_col_idx.to(DEVICE),
                         p.values.to(DEVICE), None if p.scale is None else p.scale.to(DEVICE),
                         None if bias is None else bias.to(DEVICE), p.out_features, **kwargs)


def _reference(p, x, bias):
    return _ref.bsr_linear(x, p.block_row_ptr, p.block_col_idx, p.values, p.scale, bias, p.out_features)


def _assert_matches_reference(out, p, x, bias):
    """Error vs an fp64 product of the stored weight at most 2x the reference's own error, plus
    one rounding of the output dtype (the two sum in different orders, so a result can land on
    the neighbouring representable value)."""
    out = out.cpu()
    ref = _reference(p, x, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    truth = x.double() @ p.unpack().double().T
    if bias is not None:
        truth = truth + bias.double()
    ref_err = (ref.double() - truth).abs().max()
    tol = 2 * ref_err + torch.finfo(x.dtype).eps * truth.abs()
    err = (out.double() - truth).abs()
    assert bool((err <= tol).all()), f"max error {err.max():.3g} vs reference error {ref_err:.3g}"
    # Block rows without stored blocks give exactly the bias (or zero).
    counts = (p.block_row_ptr[1:] - p.block_row_ptr[:-1]).repeat_interleave(p.block[0])[:p.out_features]
    empty = counts == 0
    expected = torch.zeros_like(out[:, empty]) if bias is None else bias[empty].float().to(x.dtype).expand_as(out[:, empty])
    assert torch.equal(out[:, empty], expected)


# Tensor-core blocks: every value dtype meets every x dtype.
DOT_CASES = [(block, vd, xd) for block in ((16, 16), (32, 32)) for vd in VALUE_DTYPES for xd in FLOAT_DTYPES]
# Small blocks (the CUDA-core path) cost more in the interpreter: each value dtype once, each x
# dtype on every block, same-dtype and mixed pairs.
FMA_CASES = [((4, 4), torch.float32, torch.float32), ((4, 4), torch.int8, torch.bfloat16),
             ((1, 8), torch.bfloat16, torch.bfloat16), ((1, 8), torch.float16, torch.float32),
             ((3, 5), torch.float16, torch.float16), ((3, 5), torch.int8, torch.float32),
             ((8, 1), torch.float32, torch.bfloat16), ((24, 40), torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("block,value_dtype,x_dtype", DOT_CASES + FMA_CASES, ids=_ids)
def test_bsr_linear_matches_reference(block, value_dtype, x_dtype):
    small = block[0] < 16
    # Every program of the CUDA-core path costs the interpreter more: fewer rows and calls there.
    n, k = (19, 37) if small else (4 * block[0] + 3, 5 * block[1] - 2)
    seed = 7 * block[0] + block[1] + VALUE_DTYPES.index(value_dtype) * 3 + FLOAT_DTYPES.index(x_dtype)
    p = _pack(_block_sparse_weight(n, k, block, seed), block, value_dtype)
    bias = torch.randn(n, generator=_gen(seed + 1))
    for m, use_bias in ((1, True), (33, False)) if small else ((1, True), (17, False), (33, True)):
        x = torch.randn(m, k, generator=_gen(seed + m)).to(x_dtype)
        b = bias if use_bias else None
        _assert_matches_reference(_run(p, x, b), p, x, b)


@pytest.mark.parametrize("block", [(16, 16), (4, 4)], ids=str)
def test_dense_and_empty_weights(block):
    x = torch.randn(17, 40, generator=_gen(1)).bfloat16()
    bias = torch.randn(35, generator=_gen(2)).bfloat16()
    dense = BlockSparseWeight.pack(torch.randn(35, 40, generator=_gen(3)), block, dtype=torch.bfloat16)
    assert dense.nnz_blocks == -(-35 // block[0]) * -(-40 // block[1])
    _assert_matches_reference(_run(dense, x, bias), dense, x, bias)
    empty = BlockSparseWeight.pack(torch.zeros(35, 40), block, dtype=torch.bfloat16)
    assert empty.nnz_blocks == 0
    assert torch.equal(_run(empty, x, bias).cpu(), bias.expand(17, 35))
    assert torch.equal(_run(empty, x, None).cpu(), torch.zeros(17, 35, dtype=torch.bfloat16))


def test_many_rows_and_k_inside_one_block():
    # M crossing many M tiles; K = 5 < bw, so the only block column is mostly padding.
    block = (32, 32)
    p = _pack(_block_sparse_weight(20, 5, block, 4, densities=(1.0,)), block, torch.float16)
    x = torch.randn(4097, 5, generator=_gen(5)).half()
    bias = torch.randn(20, generator=_gen(6))
    _assert_matches_reference(_run(p, x, bias), p, x, bias)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 = NaN, as intended
def test_padding_of_stored_blocks_is_ignored():
    # Padding entries are zero by the format; x beyond K must not be read even so (it would be
    # out of bounds), and NaN/Inf in x reach only the columns that use them.
    block = (16, 16)
    p = _pack(_block_sparse_weight(20, 20, block, 8, densities=(1.0,)), block, torch.float32)
    x = torch.randn(3, 20, generator=_gen(9))
    x[1, 19] = float("inf")
    out = _run(p, x, None).cpu()
    ref = _reference(p, x, None)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite])


@pytest.mark.parametrize("k", (40, 48))  # K % bw != 0 and == 0 build different load masks
def test_bad_indices_raise_instead_of_reading_out_of_bounds(k):
    block = (16, 16)
    p = _pack(_block_sparse_weight(40, k, block, 10), block, torch.float32)
    x = torch.randn(5, k, generator=_gen(11))
    col = p.block_col_idx.clone()
    col[0] = 3  # KB = 3
    with pytest.raises(ValueError, match="block_col_idx"):
        bm.bsr_linear(x.to(DEVICE), p.block_row_ptr.to(DEVICE), col.to(DEVICE), p.values.to(DEVICE),
                      None, None, 40)
    col[0] = -1
    with pytest.raises(ValueError, match="block_col_idx"):
        ops.bsr_linear(x.to(DEVICE), p.block_row_ptr.to(DEVICE), col.to(DEVICE), p.values.to(DEVICE),
                       out_features=40, backend="triton")
    # Unchecked, a bad column still reads nothing: its block contributes zero.
    out = bm.bsr_linear(x.to(DEVICE), p.block_row_ptr.to(DEVICE), col.to(DEVICE), p.values.to(DEVICE),
                        None, None, 40, check_indices=False).cpu()
    values = p.values.clone()
    values[0] = 0
    torch.testing.assert_close(out, _ref.bsr_linear(x, p.block_row_ptr, p.block_col_idx, values, None, None, 40))
    for bad_ptr in ([0, 5, 3, 6], [0, 2, 4, p.nnz_blocks + 1], [-1, 2, 4, p.nnz_blocks]):
        with pytest.raises(ValueError, match="block_row_ptr"):
            bm.bsr_linear(x.to(DEVICE), torch.tensor(bad_ptr, dtype=torch.int32, device=DEVICE),
                          p.block_col_idx.to(DEVICE), p.values.to(DEVICE), None, None, 40)


def test_ops_door_and_zero_rows():
    block = (16, 16)
    p = _pack(_block_sparse_weight(33, 50, block, 12), block, torch.int8)
    x = torch.randn(9, 50, generator=_gen(13)).half()
    bias = torch.randn(33, generator=_gen(14)).half()
    out = ops.bsr_linear(x.to(DEVICE), p.block_row_ptr.to(DEVICE), p.block_col_idx.to(DEVICE),
                         p.values.to(DEVICE), p.scale.to(DEVICE), bias.to(DEVICE), out_features=33,
                         backend="triton")
    assert torch.equal(out.cpu(), _run(p, x, bias).cpu())
    _assert_matches_reference(out, p, x, bias)
    assert _run(p, x[:0], bias).shape == (0, 33)


@pytest.mark.parametrize("config", bm.configs(), ids=str)
def test_every_tuned_config(config):
    # Whichever config the autotuner picks must be correct (the interpreter list holds one).
    m, n, k = (33, 40, 50) if bm.INTERPRET else (300, 1000, 1000)
    for block, value_dtype in (((32, 32), torch.bfloat16), ((4, 4), torch.float16)):
        p = _pack(_block_sparse_weight(n, k, block, 15), block, value_dtype)
        x = torch.randn(m, k, generator=_gen(16)).bfloat16()
        bias = torch.randn(n, generator=_gen(17))
        _assert_matches_reference(_run(p, x, bias, config=config), p, x, bias)


def test_autotune_pruning():
    candidates = [triton.Config({"BLOCK_M": bm_}, num_warps=w, num_stages=s)
                  for bm_, w, s in ((16, 4, 3), (16, 4, 4), (64, 4, 3), (64, 8, 3), (128, 4, 4))]
    small_m = bm._prune_configs(candidates, {"M_BUCKET": 16}, USE_DOT=True)
    assert [c.kwargs["BLOCK_M"] for c in small_m] == [16, 16]
    big_m = bm._prune_configs(candidates, {"M_BUCKET": 4096}, USE_DOT=True)
    assert big_m == candidates
    cuda_cores = bm._prune_configs(candidates, {"M_BUCKET": 4096}, USE_DOT=False)
    assert [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in cuda_cores] == [
        (16, 4, 3), (64, 4, 3), (64, 8, 3), (128, 4, 4)]


def test_autotuned_path(monkeypatch):
    monkeypatch.setenv("SPARSEQ_TRITON_AUTOTUNE", "1")
    block = (32, 32)
    p = _pack(_block_sparse_weight(70, 100, block, 18), block, torch.bfloat16)
    x = torch.randn(20, 100, generator=_gen(19)).bfloat16()
    _assert_matches_reference(_run(p, x, None), p, x, None)


def test_kernel_compiles_for_hopper():
    # Without a GPU the tests above run the interpreter, which never lowers the kernel. This
    # compiles it for sm_90 the way the JIT would (no device needed: ptxas ships with triton) and
    # checks that the 32x32 bf16 case uses wgmma with cp.async-pipelined loads.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("bsr_triton_compile.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
