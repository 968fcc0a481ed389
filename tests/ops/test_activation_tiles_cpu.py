"""The many-row sparse kernels read x through a transposed, zero-padded copy (x_tiles for
sparse_csr_linear / sparse24_linear, xt for bsr_linear). A selection weight (one 1.0 per output
row) makes each output a single product, out[m, n] = x[m, col[n]] exactly, so any misplaced,
dropped or padded element of the transpose shows up as an exact mismatch, on both CPU paths."""
from __future__ import annotations

import pytest
import torch

import sparseq
from sparseq.formats import BlockSparseWeight, Sparse24Weight, SparseCSRWeight

if not sparseq.HAS_EXT:
    pytest.skip(f"sparseq extension not built ({sparseq.EXT_ERROR})", allow_module_level=True)

from .test_int8_cpu import kernel_path  # noqa: E402,F401  (fixture: runs a test on each CPU path)

ops = torch.ops.sparseq
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows around the 8/16/32/64-wide tiles (a partial last group of 8 included); columns around the
# 8-column transpose blocks, 16-column 2:4 steps and 256-column CSR segments.
MS = (5, 8, 13, 40, 71, 115)
KS = (1, 7, 9, 64, 257, 300)


def _selection(k: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] weight with a single 1.0 per row, in column col[n]; the last column always chosen."""
    cols = torch.randint(0, k, (n,), generator=gen)
    cols[-1] = k - 1
    w = torch.zeros(n, k)
    w[torch.arange(n), cols] = 1.0
    return w, cols


def _x(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(m, k, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_csr_tiles_place_every_element(kernel_path, m, k, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    w, cols = _selection(k, 2 * k + 3, gen)
    x = _x(m, k, dtype, gen)
    p = SparseCSRWeight.pack(w)
    out = ops.sparse_csr_linear(x, p.seg_ptr, p.col_offsets, p.values, None, None)
    torch.testing.assert_close(out, x[:, cols], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("m", MS)
def test_sparse24_tiles_place_every_element(kernel_path, m, dtype):
    gen = torch.Generator().manual_seed(m)
    k = 301
    w, cols = _selection(k, 2 * k, gen)  # one nonzero per row is a valid 2:4 row
    x = _x(m, k, dtype, gen)
    p = Sparse24Weight.pack(w)
    out = ops.sparse24_linear(x, p.values, p.meta, None, None)
    torch.testing.assert_close(out, x[:, cols], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (3, 5)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("m", MS)
def test_bsr_tiles_place_every_element(kernel_path, m, block, dtype):
    gen = torch.Generator().manual_seed(m * 10 + block[1])
    k = 259
    w, cols = _selection(k, 37, gen)
    x = _x(m, k, dtype, gen)
    p = BlockSparseWeight.pack(w, block)
    out = ops.bsr_linear(x, p.block_row_ptr, p.block_col_idx, p.values, None, None, p.out_features)
    torch.testing.assert_close(out, x[:, cols], rtol=0, atol=0)
