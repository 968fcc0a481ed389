"""CPU int8 kernel benchmark: each sparseq kernel beside its PyTorch baseline, same process.

    python bench/bench_int8_kernels.py [--quick] [--threads 2] [--runs 9] [--clock wall|cpu]

Baselines: fp32 nn.Linear / torch.matmul, and torch.ao.quantization.quantize_dynamic (fbgemm,
7-bit activations). Timings are medians of `runs` calls after warm-up, with the weight hot in
cache (one weight, repeated). The timing helpers are importable: bench_int8_kernels() returns
a list of dict rows that `sparseq bench int8` reuses.
"""
from __future__ import annotations

import argparse
import warnings
import time
from typing import Callable

import torch

import sparseq
from sparseq import PackedInt8Weight
from sparseq.bench import time_interleaved  # noqa: F401  (the bench scripts import it from here too)

FULL_SHAPES = {"linear_m": (1, 16, 128), "k": 4096, "n": 4096, "gemm_mnk": (512, 4096, 4096)}
QUICK_SHAPES = {"linear_m": (1, 16, 128), "k": 4096, "n": 4096, "gemm_mnk": (256, 2048, 2048)}


def time_ms(fn: Callable[[], object], runs: int = 9, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds."""
    return time_interleaved({"fn": fn}, runs, warmup)["fn"]


def _row(op: str, shape: str, impl: str, ms: float, baseline: str | None, base_ms: float | None, **extra) -> dict:
    row = {"op": op, "shape": shape, "impl": impl, "ms": round(ms, 4), "baseline": baseline,
           "baseline_ms": None if base_ms is None else round(base_ms, 4),
           "speedup": None if base_ms is None else round(base_ms / ms, 3)}
    row.update(extra)
    return row


def _quantize_dynamic(linear: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                      dtype=torch.qint8)


@torch.inference_mode()
def bench_int8_kernels(quick: bool = False, runs: int = 9, threads: int | None = 2,
                       clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Times the CPU int8 kernels and their baselines; returns one dict per (op, shape, impl).
    clock: time.perf_counter (wall), or time.process_time (CPU time of the process, which
    time slices lost to other processes do not inflate; meaningful with threads=1)."""
    if threads is not None:
        torch.set_num_threads(threads)
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    ops = torch.ops.sparseq
    rows: list[dict] = []
    k, n = shapes["k"], shapes["n"]
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n)
    packed = PackedInt8Weight.pack(linear.weight)
    dyn = _quantize_dynamic(linear)
    bias = linear.bias.detach()
    x_scale = torch.tensor([4.0 / 127])  # a calibrated range of |x| <= 4 for randn activations
    weight_bytes = packed.packed.numel()
    for m in shapes["linear_m"]:
        x = torch.randn(m, k)
        shape = f"M={m} K={k} N={n}"
        t = time_interleaved({
            "fp32": lambda: linear(x),
            "qdyn": lambda: dyn(x),
            "w8a8_63": lambda: ops.int8_linear(x, packed.packed, packed.scale, packed.rowsum, bias, 63),
            "w8a8_127": lambda: ops.int8_linear(x, packed.packed, packed.scale, packed.rowsum, bias, 127),
            "w8a8s_63": lambda: ops.int8_linear_static(x, x_scale, packed.packed, packed.scale, packed.rowsum, bias, 63),
            "w8a8s_127": lambda: ops.int8_linear_static(x, x_scale, packed.packed, packed.scale, packed.rowsum, bias,
                                                        127),
            "wo": lambda: ops.int8_weight_only_linear(x, packed.packed, packed.scale, bias),
        }, runs, clock=clock)
        rows.append(_row("linear", shape, "torch fp32 nn.Linear", t["fp32"], None, None))
        rows.append(_row("linear", shape, "torch quantize_dynamic (fbgemm)", t["qdyn"], "torch fp32 nn.Linear",
                         t["fp32"]))
        for qmax in (63, 127):
            ms = t[f"w8a8_{qmax}"]
            rows.append(_row("int8_linear", shape, f"sparseq int8_linear act_qmax={qmax}", ms,
                             "torch fp32 nn.Linear", t["fp32"], vs_quantize_dynamic=round(t["qdyn"] / ms, 3)))
        for qmax in (63, 127):
            ms = t[f"w8a8s_{qmax}"]
            rows.append(_row("int8_linear_static", shape, f"sparseq int8_linear_static act_qmax={qmax}", ms,
                             "torch fp32 nn.Linear", t["fp32"], vs_quantize_dynamic=round(t["qdyn"] / ms, 3),
                             vs_dynamic_int8_linear=round(t[f"w8a8_{qmax}"] / ms, 3)))
        rows.append(_row("int8_weight_only_linear", shape, "sparseq int8_weight_only_linear", t["wo"],
                         "torch fp32 nn.Linear", t["fp32"], vs_quantize_dynamic=round(t["qdyn"] / t["wo"], 3),
                         weight_gb_per_s=round(weight_bytes / t["wo"] / 1e6, 2)))
    gm, gk, gn = shapes["gemm_mnk"]
    a = torch.randint(-128, 128, (gm, gk), dtype=torch.int8)
    b = torch.randint(-128, 128, (gn, gk), dtype=torch.int8)
    b_no_min = b.clamp(-127, 127)
    af, bf = a.float(), b.float()
    shape = f"M={gm} K={gk} N={gn}"
    t = time_interleaved({"fp32": lambda: af @ bf.T, "random": lambda: ops.int8_gemm(a, b),
                          "no_min": lambda: ops.int8_gemm(a, b_no_min)}, max(3, runs // 3), warmup=1)
    rows.append(_row("gemm", shape, "torch fp32 matmul", t["fp32"], None, None))
    for key, label in (("random", "random int8 incl. -128"), ("no_min", "b in [-127, 127]")):
        rows.append(_row("int8_gemm", shape, f"sparseq int8_gemm ({label})", t[key], "torch fp32 matmul", t["fp32"],
                         gmac_per_s=round(gm * gk * gn / t[key] / 1e6, 1)))
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'op':<24} {'shape':<22} {'impl':<44} {'ms':>9} {'vs baseline':>12} {'vs qdyn':>8}  extra")
    for r in rows:
        sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        qd = f"{r['vs_quantize_dynamic']:.2f}x" if r.get("vs_quantize_dynamic") is not None else ""
        extra = ", ".join(f"{key}={r[key]}" for key in ("weight_gb_per_s", "gmac_per_s", "vs_dynamic_int8_linear")
                          if key in r)
        print(f"{r['op']:<24} {r['shape']:<22} {r['impl']:<44} {r['ms']:>9.3f} {sp:>12} {qd:>8}  {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller GEMM shape, same linear shapes")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time (unaffected by other processes; use with --threads 1)")
    args = parser.parse_args()
    if not sparseq.HAS_EXT:
        raise SystemExit(f"sparseq's compiled extension is not available: {sparseq.EXT_ERROR}")
    print(f"torch {torch.__version__}, {args.threads} threads, cpu features {sparseq._C.cpu_features()}")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print_rows(bench_int8_kernels(quick=args.quick, runs=args.runs, threads=args.threads, clock=clock))


if __name__ == "__main__":
    main()
