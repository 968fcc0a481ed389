"""The ops door (sparseq.ops) and the packed format, on every backend this build offers.

Kernel-specific coverage lives beside this file (test_int8_cpu.py, test_int8_cuda.py,
test_int8_triton.py); here: input validation that every backend shares, the reference itself
against an independent computation, and the n16k4 packing.
"""
import pytest
import torch

import sparseq
from sparseq import _ref, ops
from sparseq.formats import PackedInt8Weight


def _packed(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PackedInt8Weight.pack(torch.randn(n, k, generator=g))


@pytest.mark.parametrize("n,k", [(1, 1), (15, 3), (16, 4), (17, 5), (33, 67)])
def test_pack_roundtrip_and_layout(n, k):
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    p = _ref.pack_n16k4(q)
    assert p.shape == (-(-n // 16), -(-k // 4), 16, 4)
    assert torch.equal(_ref.unpack_n16k4(p, n, k), q)
    # Element (n, k) sits where csrc/include/sparseq/packed_int8.h says it does.
    flat = p.flatten()
    kq = p.shape[1]
    for i, j in [(0, 0), (n - 1, k - 1), (n // 2, k // 2)]:
        assert flat[((i // 16) * kq + j // 4) * 64 + (i % 16) * 4 + j % 4] == q[i, j]
    # Padding is zero so kernels may read whole tiles.
    assert int(p.to(torch.int32).abs().sum()) == int(q.to(torch.int32).abs().sum())


def test_packed_weight_quantization():
    w = torch.randn(40, 70)
    w[3] = 0.0
    pw = PackedInt8Weight.pack(w)
    q = pw.unpack_int8()
    assert q.abs().max() <= 127
    assert torch.equal(pw.rowsum, q.to(torch.int32).sum(1))
    assert pw.scale[3] == 1.0 and not q[3].any()
    err = (pw.unpack() - w).abs().max(dim=1).values
    assert torch.all(err <= pw.scale / 2 + 1e-6)
    assert pw.nbytes == pw.packed.numel() + 4 * 40 + 4 * 40


@pytest.mark.parametrize("bad,exc", [(torch.randn(3, 4, 5), ValueError), (torch.ones(4, 4, dtype=torch.int8), TypeError),
                                     (torch.tensor([[float("nan"), 1.0]]), ValueError), ([[1.0]], TypeError)])
def test_pack_rejects_bad_weights(bad, exc):
    with pytest.raises(exc):
        PackedInt8Weight.pack(bad)


def test_reference_gemm_matches_independent_sum():
    a = torch.randint(-128, 128, (5, 37), dtype=torch.int8)
    b = torch.randint(-128, 128, (7, 37), dtype=torch.int8)
    expect = [[sum(int(a[i, t]) * int(b[j, t]) for t in range(37)) for j in range(7)] for i in range(5)]
    assert _ref.int8_gemm(a, b).tolist() == expect
    extreme = torch.full((2, 4099), -128, dtype=torch.int8)
    assert torch.all(_ref.int8_gemm(extreme, extreme) == 128 * 128 * 4099)


def test_reference_quantize_rounds_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, 127.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q, s = _ref.quantize_per_row(x, 127)
    assert q[0].tolist() == [0, 2, 2, 0, 127] and s[0] == 1.0
    assert not q[1].any() and s[1] == 1.0 / 127


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_int8_gemm_validation(backend):
    a = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        ops.int8_gemm(a.float(), a, backend=backend)
    with pytest.raises(ValueError, match="K differs"):
        ops.int8_gemm(a, torch.zeros(2, 4, dtype=torch.int8), backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        ops.int8_gemm(a[0], a, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.int8_gemm(a, a, backend="tpu")


def test_non_contiguous_inputs_give_the_contiguous_answer():
    a = torch.randint(-128, 128, (9, 40), dtype=torch.int8)
    b = torch.randint(-128, 128, (40, 11), dtype=torch.int8).T  # [11, 40], non-contiguous
    assert torch.equal(ops.int8_gemm(a, b), _ref.int8_gemm(a, b.contiguous()))


@pytest.mark.parametrize("fn", ["int8_linear", "int8_weight_only_linear"])
def test_linear_validation(fn):
    pw = _packed(20, 30)
    args = (pw.packed, pw.scale, pw.rowsum) if fn == "int8_linear" else (pw.packed, pw.scale)
    call = getattr(ops, fn)
    with pytest.raises(ValueError, match="in_features=30"):
        call(torch.randn(4, 31), *args, in_features=30)
    with pytest.raises(ValueError, match="w_packed must be int8 of shape"):
        call(torch.randn(4, 34), *args)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        call(torch.ones(4, 30, dtype=torch.int32), *args)
    with pytest.raises(ValueError, match="2-D"):
        call(torch.randn(2, 4, 30), *args)
    with pytest.raises(ValueError, match="bias"):
        call(torch.randn(4, 30), *args, torch.randn(21))
    with pytest.raises(ValueError, match="w_packed"):
        call(torch.randn(4, 30), pw.packed[:1], *args[1:])
    if fn == "int8_linear":
        with pytest.raises(ValueError, match="act_qmax"):
            call(torch.randn(4, 30), *args, None, 100)


@pytest.mark.parametrize("act_qmax", [127, 63])
def test_auto_backend_matches_reference(act_qmax):
    pw = _packed(33, 70, seed=1)
    x = torch.randn(17, 70)
    bias = torch.randn(33)
    out = ops.int8_linear(x, pw.packed, pw.scale, pw.rowsum, bias, act_qmax)
    ref = _ref.int8_linear(x, pw.packed, pw.scale, pw.rowsum, bias, act_qmax)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out = ops.int8_weight_only_linear(x, pw.packed, pw.scale, bias)
    ref = _ref.int8_weight_only_linear(x, pw.packed, pw.scale, bias)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_skip_ext_env_takes_the_reference_path(tmp_path):
    import subprocess
    import sys

    code = "import sparseq; print(sparseq.HAS_EXT, sparseq.EXT_ERROR)"
    env = dict(__import__("os").environ, SPARSEQ_SKIP_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False disabled by SPARSEQ_SKIP_EXT"


@pytest.mark.skipif(not sparseq.HAS_EXT, reason="compiled extension not built (reference path run)")
def test_compile_fullgraph_through_the_ops():
    pw = _packed(24, 40, seed=2)

    def f(x, a, b):
        y = ops.int8_linear(x, pw.packed, pw.scale, pw.rowsum, None, 127)
        return y + ops.int8_weight_only_linear(x, pw.packed, pw.scale), ops.int8_gemm(a, b)

    x = torch.randn(5, 40)
    a = torch.randint(-128, 128, (5, 40), dtype=torch.int8)
    eager = f(x, a, a)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(x, a, a)
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1])


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("switched_off", [(), ("SPARSEQ_DISABLE_VNNI",), ("SPARSEQ_DISABLE_VNNI", "SPARSEQ_DISABLE_AVX2")],
                         ids=["best", "no-vnni", "portable"])
@pytest.mark.parametrize("act_qmax", [127, 63])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_rows_give_nan_outputs(monkeypatch, device, switched_off, act_qmax, dtype):
    for switch in ("SPARSEQ_DISABLE_VNNI", "SPARSEQ_DISABLE_AVX2"):
        monkeypatch.setenv(switch, "1" if switch in switched_off else "0")
    pw = _packed(20, 45, seed=3)
    pw = PackedInt8Weight(pw.packed.to(device), pw.scale.to(device), pw.rowsum.to(device), 45, 20)
    x = torch.randn(5, 45).to(dtype)
    x[1, 7] = float("nan")
    x[2, 44] = float("inf")  # in the scalar tail of an 8-wide loop
    x[3, 0] = -float("inf")
    q, scale = _ref.quantize_per_row(x, act_qmax)
    assert not q[1:4].any() and torch.isnan(scale[1:4]).all() and torch.isfinite(scale[[0, 4]]).all()
    x = x.to(device)
    for backend in ("auto", "reference"):
        out = ops.int8_linear(x, pw.packed, pw.scale, pw.rowsum, torch.randn(20, device=device), act_qmax,
                              backend=backend)
        assert torch.isnan(out[1:4]).all(), backend
        ref = _ref.int8_linear(x[[0, 4]], pw.packed, pw.scale, pw.rowsum, None, act_qmax)
        clean = ops.int8_linear(x[[0, 4]], pw.packed, pw.scale, pw.rowsum, None, act_qmax, backend=backend)
        torch.testing.assert_close(clean, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_non_contiguous_bias_is_accepted():
    pw = _packed(20, 30, seed=4)
    x = torch.randn(3, 30)
    bias = torch.randn(20, 2)[:, 0]  # a strided view
    out = ops.int8_linear(x, pw.packed, pw.scale, pw.rowsum, bias, 127)
    ref = _ref.int8_linear(x, pw.packed, pw.scale, pw.rowsum, bias.contiguous(), 127)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out = ops.int8_weight_only_linear(x, pw.packed, pw.scale, bias)
    torch.testing.assert_close(out, _ref.int8_weight_only_linear(x, pw.packed, pw.scale, bias), rtol=1e-4, atol=1e-4)
