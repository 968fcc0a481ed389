"""Test helpers shared by the int8 op tests (random int8 data, packed weights, float comparison)."""
from __future__ import annotations

import torch

import sparseq

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The fused GELU epilogue against the reference's F.gelu: the kernels' erf is within 3e-7 of
# torch's, so fp32 outputs agree to rounding and half dtypes to one rounding step of the output.
FUSED_GELU_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    if kind == "no_min":
        return torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
    if kind == "all_min":
        return torch.full(shape, -128, dtype=torch.int8)
    if kind == "all_max":
        return torch.full(shape, 127, dtype=torch.int8)
    if kind == "extremes":
        return torch.where(torch.rand(shape, generator=gen) < 0.5, -128, 127).to(torch.int8)
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.int8)
    raise ValueError(kind)


def _packed(n: int, k: int, gen: torch.Generator, kind: str = "random"):
    w = torch.randn(n, k, generator=gen)
    if kind == "random":
        return sparseq.PackedInt8Weight.pack(w)
    q = _int8((n, k), kind, gen)
    return sparseq.PackedInt8Weight.from_int8(q, torch.rand(n, generator=gen) + 0.5)


def _assert_float_close(out: torch.Tensor, ref: torch.Tensor, exact_fp32: torch.Tensor | None = None):
    """Differences may come only from float epilogue rounding (e.g. a fused multiply-add):
    about one fp32 ulp before the cast, so one ulp of the output dtype after it."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = ref.float().abs().amax().item() if ref.numel() else 0.0
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * scale + 1e-30)
    else:
        eps = torch.finfo(ref.dtype).eps
        torch.testing.assert_close(out.float(), ref.float(), rtol=eps, atol=1e-6 * scale + 1e-30)


CPU_KERNEL_PATHS = ("amx", "avx512", "avx2", "portable")


def select_cpu_kernel_path(monkeypatch, path: str) -> None:
    """Make the CPU ops run on ``path`` (the switches are read on every op call): "amx" (every
    kernel this CPU has: the int8 core's AMX one from 16 rows), "avx512" (AMX switched off: the
    AVX-512 kernels, the int8 core's VNNI one where the CPU has VNNI), "avx2" (AVX-512 switched
    off) or "portable" (AVX2 switched off too). Skips the test where this CPU lacks the path."""
    import pytest

    monkeypatch.setenv("SPARSEQ_DISABLE_AVX2", "1" if path == "portable" else "0")
    monkeypatch.setenv("SPARSEQ_DISABLE_AVX512", "0" if path in ("amx", "avx512") else "1")
    monkeypatch.setenv("SPARSEQ_DISABLE_AMX", "0" if path == "amx" else "1")
    monkeypatch.delenv("SPARSEQ_DISABLE_VNNI", raising=False)
    features = sparseq._C.cpu_features()
    if path != "portable" and not features["avx2_kernels_enabled"]:
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    if path in ("amx", "avx512") and not features["avx512_kernels_enabled"]:
        pytest.skip("this CPU has no AVX-512 (F, BW, VL, DQ)")
    if path == "amx" and not features["amx_kernels_enabled"]:
        pytest.skip("this CPU (or its OS) offers no AMX-INT8")
    assert features["avx2_kernels_enabled"] == (path != "portable")
    assert features["avx512_kernels_enabled"] == (path in ("amx", "avx512"))
    assert features["amx_kernels_enabled"] == (path == "amx")
    if path not in ("amx", "avx512"):
        assert not features["vnni_kernels_enabled"]
