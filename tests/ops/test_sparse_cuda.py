"""CUDA sparse kernels (csrc/cuda/sparse24_*.cu, sparse_csr_linear.cu) against sparseq._ref.

The GPU tests need an NVIDIA GPU (sm_80+) and an extension built with CUDA; elsewhere they are
skipped. The layout replay (first test) needs only g++: it feeds weights packed by
Sparse24Weight.pack to a CPU replay of the mma.sp tile index math (sparse24_mma_layout.h) and
checks the dense tile the tensor cores would see against Sparse24Weight.unpack().
"""
import os
import shutil
import struct
import subprocess

import pytest
import torch

from sparseq import _ref, ops
from sparseq.formats import SlicedEllInt8Weight, Sparse24Weight, SparseCSRWeight

from .test_int8_cuda import HAS_CUDA_KERNELS, ROOT, _rel_err

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _sparse24_dense(n, k, seed=0, ints=False):
    """A 2:4 weight [n, k] mixing every group pattern: 0, 1 or 2 nonzeros at random positions,
    an all-zero row, a row with two nonzeros in every group, and a partial last group."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // 4)
    scores = torch.rand(n, groups, 4, generator=g)
    keep = torch.randint(0, 3, (n, groups), generator=g)
    if n > 1:
        keep[0] = 0
        keep[1] = 2
    order = scores.argsort(dim=2)
    mask = torch.zeros(n, groups, 4, dtype=torch.bool)
    for j in range(2):
        mask.scatter_(2, order[..., j:j + 1], (keep > j).unsqueeze(2))
    w = torch.randint(-9, 10, (n, groups, 4), generator=g).float() if ints else torch.randn(n, groups, 4, generator=g)
    w = torch.where(w == 0, torch.ones_like(w), w) * mask
    return w.reshape(n, groups * 4)[:, :k].contiguous()


def _write_replay_cases(path):
    with open(path, "wb") as f:
        for n, k, seed in ((130, 300, 1), (64, 256, 2), (33, 5, 3), (17, 132, 4), (160, 520, 5)):
            w = _sparse24_dense(n, k, seed=seed, ints=True)
            bf = Sparse24Weight.pack(w, dtype=torch.bfloat16)
            q = Sparse24Weight.pack(w, int8=True)
            codes = Sparse24Weight(q.values, q.meta, torch.ones(n), k, n)
            for elem, packed, values in ((2, bf, bf.values.view(torch.int16)), (1, codes, q.values)):
                f.write(struct.pack("<3i", elem, n, k))
                f.write(values.contiguous().numpy().tobytes())
                f.write(packed.meta.numpy().tobytes())
                f.write(packed.unpack().float().contiguous().numpy().tobytes())


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the layout replay")
def test_sparse24_tile_layout_replays_on_cpu(tmp_path):
    exe = tmp_path / "sparse24_layout_selftest"
    src = os.path.join(ROOT, "csrc", "cuda", "sparse24_layout_selftest.cpp")
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", src, "-o", str(exe)], check=True)
    cases = tmp_path / "cases.bin"
    _write_replay_cases(cases)
    run = subprocess.run([str(exe), str(cases)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "5 bf16 and 5 s8 weights replayed over 3 tile shapes (s8 also widened to bf16): 0 failures" in run.stdout


def _tolerance(x_dtype, k):
    """Float outputs: fp32 accumulation in a different order than the reference, then one rounding
    to x's dtype; bf16/fp16 outputs are bounded by that rounding."""
    return {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[x_dtype] * (1 + (k > 1024))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA GPU (sm_80+) and sparseq built with CUDA")
class TestSparse24Cuda:
    @pytest.mark.parametrize("m,n,k", [(1, 16, 64), (17, 15, 67), (5, 33, 5), (64, 130, 300), (4097, 17, 256),
                                       (3, 256, 1), (200, 300, 1030)])
    @pytest.mark.parametrize("x_dtype", FLOATS)
    @pytest.mark.parametrize("value_dtype", FLOATS + (torch.int8,))
    def test_matches_reference(self, m, n, k, x_dtype, value_dtype):
        w = _sparse24_dense(n, k, seed=m + n + k)
        sw = Sparse24Weight.pack(w, int8=True) if value_dtype == torch.int8 else Sparse24Weight.pack(w, dtype=value_dtype)
        g = torch.Generator().manual_seed(k)
        x = torch.randn(m, k, generator=g).to(x_dtype)
        bias = torch.randn(n, generator=g) if m % 2 else None
        ref = _ref.sparse24_linear(x, sw.values, sw.meta, sw.scale, bias)
        cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
        out = ops.sparse24_linear(x.cuda(), sw.values.cuda(), sw.meta.cuda(), cuda(sw.scale), cuda(bias),
                                  backend="cuda")
        assert out.dtype == x_dtype and out.shape == (m, n)
        assert _rel_err(out.cpu(), ref) <= _tolerance(x_dtype, k)

    @pytest.mark.parametrize("sparsity_row", ["empty", "full"])
    def test_all_zero_and_full_rows(self, sparsity_row):
        n, k = 40, 128
        w = _sparse24_dense(n, k, seed=3)
        if sparsity_row == "empty":
            w.zero_()
        sw = Sparse24Weight.pack(w, dtype=torch.bfloat16)
        x = torch.randn(9, k, dtype=torch.bfloat16)
        out = torch.ops.sparseq.sparse24_linear(x.cuda(), sw.values.cuda(), sw.meta.cuda(), None, None)
        assert _rel_err(out.cpu(), _ref.sparse24_linear(x, sw.values, sw.meta)) <= 1e-2

    def test_invalid_meta_is_a_clear_error(self):
        sw = Sparse24Weight.pack(_sparse24_dense(32, 64, seed=4), dtype=torch.bfloat16)
        meta = sw.meta.clone()
        meta[5, 3] = 0x00  # positions (0, 0) twice: undefined for mma.sp
        x = torch.randn(8, 64, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(RuntimeError, match="not strictly increasing"):
            torch.ops.sparseq.sparse24_linear(x, sw.values.cuda(), meta.cuda(), None, None)
        # The SIMT path (fp32 x) follows the reference literally, duplicates included.
        out = torch.ops.sparseq.sparse24_linear(x.float(), sw.values.cuda(), meta.cuda(), None, None)
        ref = _ref.sparse24_linear(x.float().cpu(), sw.values, meta)
        assert _rel_err(out.cpu(), ref) <= 1e-5

    def test_misaligned_views(self):
        sw = Sparse24Weight.pack(_sparse24_dense(24, 128, seed=6), dtype=torch.float16)
        x = torch.randn(8, 128, dtype=torch.float16)

        def misaligned(t):  # a contiguous copy one element past an aligned address
            buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
            view = buf[1:].view(t.shape)
            view.copy_(t)
            return view

        out = torch.ops.sparseq.sparse24_linear(misaligned(x), misaligned(sw.values), misaligned(sw.meta), None, None)
        assert _rel_err(out.cpu(), _ref.sparse24_linear(x, sw.values, sw.meta)) <= 2e-3

    def test_int8_w8a8_is_exact_before_the_epilogue(self):
        for m, n, k in [(1, 16, 64), (17, 33, 300), (130, 64, 1030), (4097, 8, 128)]:
            sw = Sparse24Weight.pack(_sparse24_dense(n, k, seed=k), int8=True)
            g = torch.Generator().manual_seed(m)
            x = torch.randn(m, k, generator=g)
            for x_dtype in FLOATS:
                xd = x.to(x_dtype)
                bias = torch.randn(n, generator=g)
                for qmax in (127, 63):
                    ref = _ref.sparse24_int8_linear(xd, sw.values, sw.meta, sw.scale, bias, qmax)
                    out = ops.sparse24_int8_linear(xd.cuda(), sw.values.cuda(), sw.meta.cuda(), sw.scale.cuda(),
                                                   bias.cuda(), qmax, backend="cuda")
                    # Same integer dot and the same fp32 epilogue steps: equal up to fp32 rounding ties.
                    assert _rel_err(out.cpu(), ref) <= (1e-6 if x_dtype == torch.float32 else 8e-3)

    def test_int8_integer_inputs_are_exact(self):
        # Rows whose absmax is 127 quantize to themselves: out == int32 dot * w_scale exactly.
        n, k = 48, 256
        w = _sparse24_dense(n, k, seed=7, ints=True)
        w[:, :4] = torch.tensor([127.0, 0.0, 0.0, 0.0])  # scale 1: the codes are w itself
        sw = Sparse24Weight.pack(w, int8=True)
        x = torch.randint(-127, 128, (33, k)).float()
        x[:, 5] = 127.0
        ref = _ref.sparse24_int8_linear(x, sw.values, sw.meta, sw.scale, None, 127)
        out = torch.ops.sparseq.sparse24_int8_linear(x.cuda(), sw.values.cuda(), sw.meta.cuda(), sw.scale.cuda(),
                                                     None, 127)
        assert torch.equal(out.cpu(), ref)

    def test_opcheck(self):
        sw = Sparse24Weight.pack(_sparse24_dense(15, 67, seed=8), dtype=torch.bfloat16)
        sq = Sparse24Weight.pack(_sparse24_dense(15, 67, seed=8), int8=True)
        x = torch.randn(17, 67, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(15, device="cuda")
        op = torch.ops.sparseq.sparse24_linear.default
        torch.library.opcheck(op, (x, sw.values.cuda(), sw.meta.cuda(), None, bias))
        torch.library.opcheck(op, (x.float(), sw.values.cuda(), sw.meta.cuda(), None, None))
        torch.library.opcheck(op, (x, sq.values.cuda(), sq.meta.cuda(), sq.scale.cuda(), bias))
        torch.library.opcheck(torch.ops.sparseq.sparse24_int8_linear.default,
                              (x, sq.values.cuda(), sq.meta.cuda(), sq.scale.cuda(), bias, 127))

    def test_bad_inputs_are_clear_errors(self):
        sw = Sparse24Weight.pack(_sparse24_dense(16, 64, seed=9), dtype=torch.bfloat16)
        x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
        v, mt = sw.values.cuda(), sw.meta.cuda()
        with pytest.raises(RuntimeError, match="2:4 values must be"):
            torch.ops.sparseq.sparse24_linear(x[:, :60].contiguous(), v, mt, None, None)
        with pytest.raises(RuntimeError, match="meta must be"):
            torch.ops.sparseq.sparse24_linear(x, v, mt[:, :4].contiguous(), None, None)
        with pytest.raises(RuntimeError, match="meta must be on x's device"):
            torch.ops.sparseq.sparse24_linear(x, v, sw.meta, None, None)
        with pytest.raises(RuntimeError, match="w_scale is only for int8"):
            torch.ops.sparseq.sparse24_linear(x, v, mt, torch.ones(16, device="cuda"), None)
        with pytest.raises(RuntimeError, match="act_qmax"):
            torch.ops.sparseq.sparse24_int8_linear(x, v.to(torch.int8), mt, torch.ones(16, device="cuda"), None, 100)
        with pytest.raises(RuntimeError, match="int8"):
            torch.ops.sparseq.sparse24_int8_linear(x, v, mt, torch.ones(16, device="cuda"), None, 127)


def _csr_dense(n, k, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    if n > 2:
        w[0] = 0  # an empty row
        if sparsity < 1:
            w[1] = torch.randn(k, generator=g)  # a dense row
    return w


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA GPU (sm_80+) and sparseq built with CUDA")
class TestSparseCsrCuda:
    @pytest.mark.parametrize("m,n,k", [(1, 16, 1), (17, 15, 67), (5, 33, 257), (64, 130, 300), (4097, 17, 512),
                                       (40, 64, 1030)])
    @pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
    @pytest.mark.parametrize("x_dtype", FLOATS)
    @pytest.mark.parametrize("value_dtype", FLOATS + (torch.int8,))
    def test_matches_reference(self, m, n, k, sparsity, x_dtype, value_dtype):
        if m == 4097 and (sparsity, x_dtype, value_dtype) != (0.9, torch.bfloat16, torch.bfloat16):
            pytest.skip("the M=4097 shape runs for one dtype combination to keep the suite short")
        w = _csr_dense(n, k, sparsity, seed=m + n + k)
        cw = SparseCSRWeight.pack(w, int8=True) if value_dtype == torch.int8 else SparseCSRWeight.pack(w, dtype=value_dtype)
        g = torch.Generator().manual_seed(k)
        x = torch.randn(m, k, generator=g).to(x_dtype)
        bias = torch.randn(n, generator=g).to(x_dtype) if m % 2 else None
        ref = _ref.sparse_csr_linear(x, cw.seg_ptr, cw.col_offsets, cw.values, cw.scale, bias)
        cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
        out = ops.sparse_csr_linear(x.cuda(), cw.seg_ptr.cuda(), cw.col_offsets.cuda(), cw.values.cuda(),
                                    cuda(cw.scale), cuda(bias), backend="cuda")
        assert out.dtype == x_dtype and out.shape == (m, n)
        if sparsity == 1.0 and bias is None:
            assert not out.cpu().float().any()
        assert _rel_err(out.cpu(), ref) <= _tolerance(x_dtype, k)

    def test_corrupt_pointers_are_clear_errors(self):
        cw = SparseCSRWeight.pack(_csr_dense(8, 300, 0.5, seed=1))
        x = torch.randn(3, 300, device="cuda")
        args = lambda p: (x, p.cuda(), cw.col_offsets.cuda(), cw.values.cuda(), None, None)  # noqa: E731
        decreasing = cw.seg_ptr.clone()
        decreasing[4] = decreasing[5] + 1
        with pytest.raises(RuntimeError, match="seg_ptr"):
            torch.ops.sparseq.sparse_csr_linear(*args(decreasing))
        past_end = cw.seg_ptr.clone()
        past_end[-1] = cw.nnz + 1000
        with pytest.raises(RuntimeError, match="seg_ptr"):
            torch.ops.sparseq.sparse_csr_linear(*args(past_end))
        negative = cw.seg_ptr.clone()
        negative[0] = -5
        with pytest.raises(RuntimeError, match="seg_ptr"):
            torch.ops.sparseq.sparse_csr_linear(*args(negative))
        # An offset landing past K in the last (partial) segment.
        offsets = cw.col_offsets.clone()
        offsets[-1] = 255
        with pytest.raises(RuntimeError, match="column"):
            torch.ops.sparseq.sparse_csr_linear(x, cw.seg_ptr.cuda(), offsets.cuda(), cw.values.cuda(), None, None)

    def test_opcheck(self):
        cw = SparseCSRWeight.pack(_csr_dense(15, 67, 0.9, seed=2), dtype=torch.bfloat16)
        cq = SparseCSRWeight.pack(_csr_dense(15, 67, 0.9, seed=2), int8=True)
        x = torch.randn(17, 67, device="cuda", dtype=torch.bfloat16)
        op = torch.ops.sparseq.sparse_csr_linear.default
        torch.library.opcheck(op, (x, cw.seg_ptr.cuda(), cw.col_offsets.cuda(), cw.values.cuda(), None,
                                   torch.randn(15, device="cuda")))
        torch.library.opcheck(op, (x.float(), cq.seg_ptr.cuda(), cq.col_offsets.cuda(), cq.values.cuda(),
                                   cq.scale.cuda(), None))

    def test_bad_inputs_are_clear_errors(self):
        cw = SparseCSRWeight.pack(_csr_dense(8, 64, 0.5, seed=3))
        x = torch.randn(3, 64, device="cuda")
        with pytest.raises(RuntimeError, match="seg_ptr has"):
            torch.ops.sparseq.sparse_csr_linear(x, cw.seg_ptr[:-1].cuda(), cw.col_offsets.cuda(), cw.values.cuda(),
                                                None, None)
        with pytest.raises(RuntimeError, match="one entry per column offset"):
            torch.ops.sparseq.sparse_csr_linear(x, cw.seg_ptr.cuda(), cw.col_offsets.cuda(), cw.values[:-1].cuda(),
                                                None, None)
        with pytest.raises(RuntimeError, match="seg_ptr must be on x's device"):
            torch.ops.sparseq.sparse_csr_linear(x, cw.seg_ptr, cw.col_offsets.cuda(), cw.values.cuda(), None, None)

    def test_ops_door_routes_to_the_cuda_kernels(self):
        cw = SparseCSRWeight.pack(_csr_dense(17, 40, 0.9, seed=4))
        sw = Sparse24Weight.pack(_sparse24_dense(17, 40, seed=4), dtype=torch.bfloat16)
        x = torch.randn(3, 40, device="cuda", dtype=torch.bfloat16)
        csr = (x, cw.seg_ptr.cuda(), cw.col_offsets.cuda(), cw.values.cuda(), None, None)
        assert torch.equal(ops.sparse_csr_linear(*csr), torch.ops.sparseq.sparse_csr_linear(*csr))
        s24 = (x, sw.values.cuda(), sw.meta.cuda(), None, None)
        assert torch.equal(ops.sparse24_linear(*s24), torch.ops.sparseq.sparse24_linear(*s24))


def _sell_args(p, device="cuda"):
    return [t.to(device) for t in (p.block_step_ptr, p.step_masks, p.slice_ptr, p.col_offsets, p.values, p.scale)]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA GPU (sm_80+) and sparseq built with CUDA")
class TestSparseSellInt8Cuda:
    @pytest.mark.parametrize("m,n,k", [(1, 16, 1), (17, 15, 67), (5, 33, 257), (64, 130, 300), (4097, 17, 128),
                                       (40, 64, 1030)])
    @pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
    @pytest.mark.parametrize("x_dtype", FLOATS)
    def test_matches_reference(self, m, n, k, sparsity, x_dtype):
        p = SlicedEllInt8Weight.pack(_csr_dense(n, k, sparsity, seed=m + n + k))
        g = torch.Generator().manual_seed(k)
        x = torch.randn(m, k, generator=g).to(x_dtype)
        bias = torch.randn(n, generator=g) if m % 2 else None
        for qmax in (127, 63):
            ref = _ref.sparse_sell_int8_linear(x, *_sell_args(p, "cpu"), bias, qmax)
            out = ops.sparse_sell_int8_linear(x.cuda(), *_sell_args(p), None if bias is None else bias.cuda(), qmax,
                                              backend="cuda")
            # The same integer dots and fp32 epilogue steps as the reference.
            assert _rel_err(out.cpu(), ref) <= (1e-6 if x_dtype == torch.float32 else 8e-3)

    def test_opcheck(self):
        p = SlicedEllInt8Weight.pack(_csr_dense(15, 67, 0.9, seed=2))
        x = torch.randn(17, 67, device="cuda", dtype=torch.bfloat16)
        op = torch.ops.sparseq.sparse_sell_int8_linear.default
        torch.library.opcheck(op, (x, *_sell_args(p), torch.randn(15, device="cuda"), 127))
        torch.library.opcheck(op, (x.float(), *_sell_args(p), None, 63))

    def test_inconsistent_weights_are_refused(self):
        p = SlicedEllInt8Weight.pack(_csr_dense(37, 100, 0.3, seed=3))
        x = torch.randn(3, 100, device="cuda")
        bad_masks = p.step_masks.clone()
        bad_masks[-1] |= 1 << 63  # a lane of a row past N
        bad_offsets = p.col_offsets.clone()
        bad_offsets[-1] = 63  # past K in the short last block
        for masks, offsets in ((bad_masks, p.col_offsets), (p.step_masks, bad_offsets)):
            args = _sell_args(p)
            args[1], args[3] = masks.cuda(), offsets.cuda()
            with pytest.raises(RuntimeError, match="sliced-ELL weight is inconsistent"):
                torch.ops.sparseq.sparse_sell_int8_linear(x, *args, None, 127)
        args = _sell_args(p)
        with pytest.raises(RuntimeError, match="step_masks must be on x's device"):
            torch.ops.sparseq.sparse_sell_int8_linear(x, args[0], p.step_masks, *args[2:], None, 127)
