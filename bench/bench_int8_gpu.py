"""GPU benchmark: sparseq's CUDA (and Triton) int8 kernels beside their torch baselines.

    python3 bench/bench_int8_gpu.py --json gpu_bench.json [--quick]

Each entry is timed with CUDA events (warm-up, then the median of repeated runs) and reports
the kernel, the baseline, and speedup = baseline_ms / kernel_ms (> 1: sparseq is faster):
  * int8_gemm            vs torch._int_mm (cuBLASLt int8)           at 4096^3 and other shapes
  * int8_linear          vs F.linear in bf16 (x, weight bf16)       at M in {1, 16, 128, 4096}, K=N=4096
  * int8_linear triton   vs the same bf16 F.linear                  when sparseq.triton imports
  * weight-only int8     vs F.linear in bf16                        at M in {1, 16}
Each case also checks the kernel's answer against the baseline's (exactly for int8_gemm), so a
fast wrong kernel shows up here too. Weights are reused between runs ("hot": a 4096x4096 int8
weight fits in the H100's 50 MB L2), which flatters the small-M cases of both sides alike.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F


def time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_case(results: list, name: str, shape: dict, kernel, baseline, check, warmup: int, iters: int) -> None:
    entry = {"name": name, **shape}
    try:
        entry["check"] = check(kernel(), baseline())
        entry["kernel_ms"] = time_ms(kernel, warmup, iters)
        entry["baseline_ms"] = time_ms(baseline, warmup, iters)
        entry["speedup"] = entry["baseline_ms"] / entry["kernel_ms"]
        if "flops" in shape:
            entry["kernel_tops"] = shape["flops"] / entry["kernel_ms"] / 1e9
            entry["baseline_tops"] = shape["flops"] / entry["baseline_ms"] / 1e9
    except Exception as exc:  # one failing case must not hide the others
        entry["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    results.append(entry)
    timing = (f"kernel {entry['kernel_ms']:.4f} ms  baseline {entry['baseline_ms']:.4f} ms  "
              f"speedup {entry['speedup']:.2f}x" if "speedup" in entry else f"ERROR {entry.get('error')}")
    print(f"{name:28s} {str(shape):52s} {timing}  check={entry.get('check')}", flush=True)


def device_report(warmup: int, iters: int) -> dict:
    """The machine and build a result file was measured on, with an empty results list."""
    import sparseq

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    return {
        "device": props.name, "sm_count": props.multi_processor_count,
        "capability": list(torch.cuda.get_device_capability(dev)),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "sparseq_cuda_kernels": sparseq.HAS_EXT and bool(getattr(sparseq._C, "with_cuda", False)),
        "warmup": warmup, "iters": iters, "results": [],
    }


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_bench.json")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    warmup, iters = (3, 10) if args.quick else (10, 50)

    from sparseq import ops
    from sparseq.formats import PackedInt8Weight

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    report = device_report(warmup, iters)
    cuda_ok = report["sparseq_cuda_kernels"]
    try:
        import triton

        import sparseq.triton.int8_matmul  # noqa: F401  (the backend="triton" kernels)

        report["triton"] = triton.__version__
    except ImportError as exc:
        report["triton"] = None
        print(f"Triton backend not importable ({exc}); its cases are skipped")
    results = report["results"]
    gen = torch.Generator(device=dev).manual_seed(0)

    def exact(out, ref):
        return bool(torch.equal(out, ref))

    if cuda_ok:
        for m, n, k in [(4096, 4096, 4096), (8192, 8192, 8192), (2048, 2048, 2048), (4096, 11008, 4096),
                        (128, 4096, 4096), (32, 4096, 4096)]:
            a = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8, generator=gen)
            b = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8, generator=gen)
            bt = b.t()  # torch._int_mm wants [K, N]; a transposed view of b is what cuBLASLt likes
            run_case(results, "int8_gemm vs _int_mm", {"M": m, "N": n, "K": k, "flops": 2 * m * n * k},
                     lambda a=a, b=b: torch.ops.sparseq.int8_gemm(a, b), lambda a=a, bt=bt: torch._int_mm(a, bt),
                     exact, warmup, iters)

    k = n = 4096
    w = torch.randn(n, k, device=dev, generator=gen) / 64
    bias = torch.randn(n, device=dev, generator=gen)
    pw = PackedInt8Weight.pack(w)
    w_bf16, bias_bf16 = w.to(torch.bfloat16), bias.to(torch.bfloat16)
    for m in (1, 16, 128, 4096):
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        shape = {"M": m, "N": n, "K": k, "dtype": "bfloat16", "flops": 2 * m * n * k}
        base = lambda x=x: F.linear(x, w_bf16, bias_bf16)  # noqa: E731
        if cuda_ok:
            run_case(results, "int8_linear cuda vs bf16", shape,
                     lambda x=x: torch.ops.sparseq.int8_linear(x, pw.packed, pw.scale, pw.rowsum, bias, 127), base,
                     rel_err, warmup, iters)
        if report["triton"]:
            run_case(results, "int8_linear triton vs bf16", shape,
                     lambda x=x: ops.int8_linear(x, pw.packed, pw.scale, pw.rowsum, bias, 127, backend="triton"),
                     base, rel_err, warmup, iters)
        if cuda_ok and m <= 16:
            run_case(results, "weight_only cuda vs bf16", shape,
                     lambda x=x: torch.ops.sparseq.int8_weight_only_linear(x, pw.packed, pw.scale, bias), base,
                     rel_err, warmup, iters)

    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
