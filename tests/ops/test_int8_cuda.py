"""CUDA kernels (csrc/cuda) against sparseq._ref.

The GPU tests need an NVIDIA GPU (compute capability >= 8.0) and an extension built with CUDA;
elsewhere they are skipped. References are computed on the CPU, where _ref's int64 matmul and
fp32 division are exact, so integer results must match bit for bit and int8_linear up to the
final rounding to x's dtype. The layout replay (first test) needs only a C++ compiler: it checks
the tensor-core tile index math of int8_mma_layout.h against the PTX fragment definitions.
"""
import os
import shutil
import subprocess

import pytest
import torch

import sparseq
from sparseq import _ref, ops
from sparseq.formats import PackedInt8Weight

from .int8_helpers import FUSED_GELU_TOL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cuda_kernels_available() -> bool:
    if not (sparseq.HAS_EXT and torch.cuda.is_available()):
        return False
    from sparseq import _C

    return bool(_C.with_cuda) and torch.cuda.get_device_capability() >= (8, 0)


HAS_CUDA_KERNELS = _cuda_kernels_available()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the layout replay")
def test_tensor_core_tile_layout_replays_on_cpu(tmp_path):
    exe = tmp_path / "mma_layout_selftest"
    src = os.path.join(ROOT, "csrc", "cuda", "mma_layout_selftest.cpp")
    subprocess.run(["g++", "-std=c++17", "-O1", src, "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all layouts ok" in run.stdout


def _randint8(*shape, seed=0, low=-128, high=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int8)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is one element past an aligned address."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def _packed_weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PackedInt8Weight.pack(torch.randn(n, k, generator=g))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA GPU (sm_80+) and sparseq built with CUDA")
class TestCudaKernels:
    # M, N, K: tails of every tile (M=1, 17, 4097; N=1, 15, 17; K=1, 3, 67, 4099, multiples of 16
    # but not of 64), and shapes that pick each tile size (small, medium, 128x128) on an H100/A100.
    GEMM_SHAPES = [(1, 1, 1), (1, 15, 3), (17, 17, 67), (4097, 17, 35), (33, 1, 4099), (17, 15, 16),
                   (64, 64, 80), (130, 4096, 48), (2048, 1152, 96), (2049, 1153, 99), (129, 257, 515),
                   (5, 3, 0), (0, 4, 8)]

    @pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
    def test_int8_gemm_exact(self, m, n, k):
        a, b = _randint8(m, k, seed=1), _randint8(n, k, seed=2)
        out = torch.ops.sparseq.int8_gemm(a.cuda(), b.cuda())
        assert out.dtype == torch.int32 and out.shape == (m, n) and out.is_cuda
        assert torch.equal(out.cpu(), _ref.int8_gemm(a, b))

    @pytest.mark.parametrize("va,vb", [(-128, -128), (127, 127), (-128, 127)])
    def test_int8_gemm_extreme_values(self, va, vb):
        m, n, k = 17, 33, 4099
        a = torch.full((m, k), va, dtype=torch.int8, device="cuda")
        b = torch.full((n, k), vb, dtype=torch.int8, device="cuda")
        out = ops.int8_gemm(a, b, backend="cuda")
        assert torch.all(out == va * vb * k)

    def test_int8_gemm_misaligned_and_odd_k_views(self):
        a, b = _randint8(37, 64, seed=3), _randint8(19, 64, seed=4)
        a_view, b_view = _misaligned(a.cuda()), _misaligned(b.cuda())
        assert a_view.data_ptr() % 16 != 0
        assert torch.equal(torch.ops.sparseq.int8_gemm(a_view, b_view).cpu(), _ref.int8_gemm(a, b))

    @pytest.mark.parametrize("m,n,k", [(1, 17, 1), (17, 15, 67), (4097, 17, 35), (33, 1, 4099), (3, 40, 3),
                                       (130, 4096, 64), (2048, 1152, 96), (2049, 1153, 99)])
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("act_qmax", [127, 63])
    @pytest.mark.parametrize("with_bias", [False, True])
    def test_int8_linear_matches_reference(self, m, n, k, dtype, act_qmax, with_bias):
        pw = _packed_weight(n, k, seed=m + n + k)
        g = torch.Generator().manual_seed(k)
        x = (torch.randn(m, k, generator=g) * 3).to(dtype)
        if m > 2:
            x[m // 2] = 0  # a zero row takes the absmax = 1 path
        bias = torch.randn(n, generator=g) if with_bias else None
        ref = _ref.int8_linear(x, pw.packed, pw.scale, pw.rowsum, bias, act_qmax)
        out = torch.ops.sparseq.int8_linear(x.cuda(), pw.packed.cuda(), pw.scale.cuda(), pw.rowsum.cuda(),
                                            None if bias is None else bias.cuda(), act_qmax)
        assert out.dtype == dtype and out.shape == (m, n)
        # Same fp32 steps as the reference: equal up to one rounding of the output dtype (an
        # off-by-one quantized value would show as a relative error far above these).
        rtol = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
        torch.testing.assert_close(out.cpu(), ref, rtol=rtol, atol=1e-6)

    @pytest.mark.parametrize("m,n,k", [(1, 17, 35), (4097, 1536, 384)])
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("static", [False, True])
    def test_int8_linear_fused_gelu_matches_reference(self, m, n, k, dtype, static):
        pw = _packed_weight(n, k, seed=m + n)
        g = torch.Generator().manual_seed(k)
        x = (torch.randn(m, k, generator=g) * 3).to(dtype)
        bias = torch.randn(n, generator=g)
        scale = torch.tensor([0.03])
        if static:
            ref = _ref.int8_linear_static(x, scale, pw.packed, pw.scale, pw.rowsum, bias, 127, "gelu")
            out = ops.int8_linear_static(x.cuda(), scale.cuda(), pw.packed.cuda(), pw.scale.cuda(), pw.rowsum.cuda(),
                                         bias.cuda(), 127, "gelu", backend="cuda")
        else:
            ref = _ref.int8_linear(x, pw.packed, pw.scale, pw.rowsum, bias, 127, "gelu")
            out = ops.int8_linear(x.cuda(), pw.packed.cuda(), pw.scale.cuda(), pw.rowsum.cuda(), bias.cuda(), 127,
                                  "gelu", backend="cuda")
        tol = FUSED_GELU_TOL[dtype]
        torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=tol, atol=tol)

    @pytest.mark.parametrize("k", [1, 67, 4099])
    def test_int8_linear_integer_inputs_are_exact(self, k):
        # Rows whose absmax is act_qmax quantize to themselves with scale 1; with unit weight
        # scales the output is the exact int32 GEMM.
        m, n = 19, 40
        x = _randint8(m, k, seed=5, low=-127, high=128).float()
        x[:, 0] = 127
        w = _randint8(n, k, seed=6)
        pw = PackedInt8Weight.from_int8(w, torch.ones(n))
        out = ops.int8_linear(x.cuda(), pw.packed.cuda(), pw.scale.cuda(), pw.rowsum.cuda(), None, 127,
                              backend="cuda")
        expect = _ref.int8_gemm(x.to(torch.int8), w).float()
        assert torch.equal(out.cpu(), expect)

    def test_int8_linear_extreme_weights(self):
        m, n, k = 5, 17, 4099
        w = torch.full((n, k), -128, dtype=torch.int8)
        w[1::2] = 127
        pw = PackedInt8Weight.from_int8(w, torch.full((n,), 0.01))
        x = torch.randn(m, k)
        ref = _ref.int8_linear(x, pw.packed, pw.scale, pw.rowsum, None, 127)
        out = ops.int8_linear(x.cuda(), pw.packed.cuda(), pw.scale.cuda(), pw.rowsum.cuda(), None, 127,
                              backend="cuda")
        torch.testing.assert_close(out.cpu(), ref, rtol=2.0**-20, atol=1e-6)

    def test_int8_linear_misaligned_packed_weight(self):
        pw = _packed_weight(33, 70, seed=7)
        x = torch.randn(9, 70)
        ref = _ref.int8_linear(x, pw.packed, pw.scale, pw.rowsum, None, 127)
        w_view = _misaligned(pw.packed.cuda())
        assert w_view.data_ptr() % 16 != 0
        out = torch.ops.sparseq.int8_linear(x.cuda(), w_view, pw.scale.cuda(), pw.rowsum.cuda(), None, 127)
        torch.testing.assert_close(out.cpu(), ref, rtol=2.0**-20, atol=1e-6)

    @pytest.mark.parametrize("m", [1, 3, 16, 17, 33])
    @pytest.mark.parametrize("n,k", [(1, 1), (15, 3), (17, 67), (40, 4099), (256, 256)])
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("with_bias", [False, True])
    def test_weight_only_matches_reference(self, m, n, k, dtype, with_bias):
        pw = _packed_weight(n, k, seed=m * n + k)
        g = torch.Generator().manual_seed(m + k)
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g) if with_bias else None
        ref = _ref.int8_weight_only_linear(x, pw.packed, pw.scale, bias)
        out = torch.ops.sparseq.int8_weight_only_linear(x.cuda(), pw.packed.cuda(), pw.scale.cuda(),
                                                        None if bias is None else bias.cuda())
        assert out.dtype == dtype and out.shape == (m, n)
        # fp32 accumulation in another order (M <= 16), or cuBLAS on a weight rounded to x's dtype
        # (M > 16): errors of the order of the dtype's precision, relative to the output's scale.
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
        assert _rel_err(out.cpu(), ref) <= tol

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_weight_only_misaligned_x_and_weight(self, dtype):
        pw = _packed_weight(24, 64, seed=8)
        x = torch.randn(4, 64).to(dtype)
        ref = _ref.int8_weight_only_linear(x, pw.packed, pw.scale, None)
        x_view, w_view = _misaligned(x.cuda()), _misaligned(pw.packed.cuda())
        out = torch.ops.sparseq.int8_weight_only_linear(x_view, w_view, pw.scale.cuda(), None)
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
        assert _rel_err(out.cpu(), ref) <= tol

    def test_weight_only_extreme_weights(self):
        w = torch.full((17, 4099), -128, dtype=torch.int8)
        w[::3] = 127
        pw = PackedInt8Weight.from_int8(w, torch.full((17,), 0.5))
        x = torch.rand(2, 4099)
        ref = _ref.int8_weight_only_linear(x, pw.packed, pw.scale, None)
        out = ops.int8_weight_only_linear(x.cuda(), pw.packed.cuda(), pw.scale.cuda(), None, backend="cuda")
        assert _rel_err(out.cpu(), ref) <= 1e-5

    def test_opcheck(self):
        a, b = _randint8(17, 67, seed=9).cuda(), _randint8(15, 67, seed=10).cuda()
        torch.library.opcheck(torch.ops.sparseq.int8_gemm.default, (a, b))
        pw = _packed_weight(15, 67, seed=11)
        w = (pw.packed.cuda(), pw.scale.cuda())
        x = torch.randn(17, 67, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(15, device="cuda")
        torch.library.opcheck(torch.ops.sparseq.int8_linear.default, (x, *w, pw.rowsum.cuda(), bias, 127))
        torch.library.opcheck(torch.ops.sparseq.int8_linear.default, (x.float(), *w, pw.rowsum.cuda(), None, 63))
        torch.library.opcheck(torch.ops.sparseq.int8_weight_only_linear.default, (x, *w, bias))
        torch.library.opcheck(torch.ops.sparseq.int8_weight_only_linear.default, (x[:3].half(), *w, None))

    def test_cpu_tensor_mixed_with_cuda_is_a_clear_error(self):
        a = _randint8(4, 8)
        with pytest.raises(RuntimeError, match="same CUDA device"):
            torch.ops.sparseq.int8_gemm(a.cuda(), a)
        pw = _packed_weight(16, 8)
        x = torch.randn(4, 8, device="cuda")
        with pytest.raises(RuntimeError, match="same device"):
            torch.ops.sparseq.int8_linear(x, pw.packed, pw.scale.cuda(), pw.rowsum.cuda(), None, 127)
        with pytest.raises(RuntimeError, match="bias must be on x's device"):
            torch.ops.sparseq.int8_linear(x, pw.packed.cuda(), pw.scale.cuda(), pw.rowsum.cuda(), torch.zeros(16),
                                          127)
        with pytest.raises(RuntimeError, match="w_rowsum must be on x's device"):
            torch.ops.sparseq.int8_linear(x, pw.packed.cuda(), pw.scale.cuda(), pw.rowsum, None, 127)
        with pytest.raises(RuntimeError, match="same device"):
            torch.ops.sparseq.int8_weight_only_linear(x, pw.packed.cuda(), pw.scale, None)

    def test_bad_inputs_are_clear_errors(self):
        a = _randint8(4, 8).cuda()
        with pytest.raises(RuntimeError, match="int8"):
            torch.ops.sparseq.int8_gemm(a.float(), a)
        with pytest.raises(RuntimeError, match="K differs"):
            torch.ops.sparseq.int8_gemm(a, a[:, :4].contiguous())
        with pytest.raises(RuntimeError, match="contiguous"):
            torch.ops.sparseq.int8_gemm(a.t(), a)
        pw = _packed_weight(16, 8)
        w = (pw.packed.cuda(), pw.scale.cuda(), pw.rowsum.cuda())
        x = torch.randn(4, 8, device="cuda")
        with pytest.raises(RuntimeError, match="act_qmax"):
            torch.ops.sparseq.int8_linear(x, *w, None, 100)
        with pytest.raises(RuntimeError, match="w_rowsum"):
            torch.ops.sparseq.int8_linear(x, w[0], w[1], w[2].float(), None, 127)
        with pytest.raises(RuntimeError, match="does not match"):
            torch.ops.sparseq.int8_linear(torch.randn(4, 12, device="cuda"), *w, None, 127)
        with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
            torch.ops.sparseq.int8_weight_only_linear(x.double(), w[0], w[1], None)

    def test_ops_door_routes_to_the_cuda_kernels(self):
        pw = _packed_weight(17, 40, seed=12)
        x = torch.randn(3, 40, device="cuda")
        args = (x, pw.packed.cuda(), pw.scale.cuda(), pw.rowsum.cuda(), None, 127)
        assert torch.equal(ops.int8_linear(*args), torch.ops.sparseq.int8_linear(*args))
        assert torch.equal(ops.int8_linear(*args, backend="cuda"), torch.ops.sparseq.int8_linear(*args))
