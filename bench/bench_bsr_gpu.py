"""GPU benchmark: sparseq's Triton block-sparse linear (BSR) beside dense bf16 F.linear.

    python3 bench/bench_bsr_gpu.py --json bsr_gpu_bench.json [--quick]
    TRITON_INTERPRET=1 python3 bench/bench_bsr_gpu.py --smoke --json /tmp/bsr.json   # no GPU

Headline: 90 % of the 32x32 blocks empty, M = N = K = 4096, bf16 x and values, against
F.linear(x, W, bias) with the same weight dense in bf16 (cuBLAS); target speedup >= 4x
(the ideal, all work proportional to stored blocks, is 10x). Other rows: 75 % / 50 % sparsity,
16x16 blocks, int8 values, 4x4 blocks (CUDA-core path), decode-sized M.

Three timings per case, each the median of repeated runs with CUDA events:
  kernel_ms            ops.bsr_linear(backend="triton") as a user calls it: it reads the kernel's
                       8-byte index-error flags back, one host sync per call;
  kernel_unchecked_ms  check_indices=False (indices validated once, at BlockSparseWeight.pack):
                       no sync;
  baseline_ms          F.linear in bf16;
and the same three "streamed": `iters` calls back to back between two events, divided by iters,
so launch overhead hides behind the GPU as it does inside a model (the checked call cannot hide
it: its sync is in the stream time). speedup = baseline_ms / kernel_unchecked_ms (streamed
speedups beside it). Weights are reused between runs ("hot" in L2 where they fit) on both sides.
The first call of a case autotunes the kernel (not timed). --smoke runs tiny shapes on CPU tensors
in Triton's interpreter, checks only (for testing this script without a GPU).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback

import torch
import torch.nn.functional as F

from bench_int8_gpu import rel_err, time_ms

HEADLINE_TARGET = 4.0
# name, M, N, K, block, fraction of blocks stored, values dtype
CASES = [
    ("bsr 90% 32x32 bf16", 4096, 4096, 4096, (32, 32), 0.10, torch.bfloat16),
    ("bsr 75% 32x32 bf16", 4096, 4096, 4096, (32, 32), 0.25, torch.bfloat16),
    ("bsr 50% 32x32 bf16", 4096, 4096, 4096, (32, 32), 0.50, torch.bfloat16),
    ("bsr 90% 16x16 bf16", 4096, 4096, 4096, (16, 16), 0.10, torch.bfloat16),
    ("bsr 90% 32x32 int8", 4096, 4096, 4096, (32, 32), 0.10, torch.int8),
    ("bsr 90% 4x4 bf16", 4096, 4096, 4096, (4, 4), 0.10, torch.bfloat16),
    ("bsr 90% 32x32 bf16 M=16", 16, 4096, 4096, (32, 32), 0.10, torch.bfloat16),
]
SMOKE_CASES = [("smoke 90% 32x32", 33, 96, 100, (32, 32), 0.10, torch.bfloat16),
               ("smoke 75% 4x4 int8", 17, 40, 50, (4, 4), 0.25, torch.int8)]


def stream_ms(fn, iters: int) -> float:
    """Mean time of `iters` back-to-back calls between two CUDA events (after one warm call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def block_sparse_weight(n: int, k: int, block: tuple[int, int], density: float, device, gen) -> torch.Tensor:
    """bf16 W [N, K] ~ N(0, 1/64^2) whose blocks are each kept with probability `density`."""
    bh, bw = block
    keep = torch.rand(-(-n // bh), -(-k // bw), device=device, generator=gen) < density
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    w = torch.randn(n, k, device=device, generator=gen) / 64
    return (w * mask).to(torch.bfloat16)


def run_case(case, device, gen, warmup: int, iters: int, timed: bool) -> dict:
    from sparseq import ops
    from sparseq.formats import BlockSparseWeight
    from sparseq.triton import bsr_matmul

    name, m, n, k, block, density, values_dtype = case
    entry = {"name": name, "M": m, "N": n, "K": k, "block": list(block), "density_target": density,
             "values": str(values_dtype).replace("torch.", ""), "dtype": "bfloat16"}
    try:
        w = block_sparse_weight(n, k, block, density, device, gen)
        packed = (BlockSparseWeight.pack(w, block, int8=True) if values_dtype == torch.int8
                  else BlockSparseWeight.pack(w, block, dtype=values_dtype))
        # The baseline multiplies the weight the kernel sees (int8 codes dequantized).
        w_dense = packed.unpack().to(torch.bfloat16)
        x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
        x_itemsize = x.element_size()
        bias = torch.randn(n, device=device, generator=gen).to(torch.bfloat16)
        tensors = (x, packed.block_row_ptr, packed.block_col_idx, packed.values, packed.scale, bias)
        stored = packed.nnz_blocks * block[0] * block[1]
        entry.update(nnz_blocks=packed.nnz_blocks, density=stored / (n * k),
                     tensor_cores=bsr_matmul.uses_tensor_cores(block),
                     flops_dense=2 * m * n * k, flops_stored=2 * m * stored,
                     # Each (M tile, block row) program reads its stored blocks' x columns: x is
                     # read density * N / bh times over, from L2 mostly (the reuse a dense GEMM
                     # tile gets from N=128..256 columns is bh here).
                     x_bytes_read=packed.nnz_blocks * block[1] * m * x_itemsize)

        def kernel():
            return ops.bsr_linear(*tensors, out_features=n, backend="triton")

        def kernel_unchecked():
            return bsr_matmul.bsr_linear(*tensors, n, check_indices=False)

        def baseline():
            return F.linear(x, w_dense, bias)

        expected = baseline()
        entry["rel_err"] = rel_err(kernel(), expected)  # the first call autotunes
        entry["rel_err_unchecked"] = rel_err(kernel_unchecked(), expected)
        if timed:
            for label, fn in (("kernel", kernel), ("kernel_unchecked", kernel_unchecked), ("baseline", baseline)):
                entry[f"{label}_ms"] = time_ms(fn, warmup, iters)
                entry[f"{label}_stream_ms"] = stream_ms(fn, iters)
            entry["speedup"] = entry["baseline_ms"] / entry["kernel_unchecked_ms"]
            entry["speedup_checked"] = entry["baseline_ms"] / entry["kernel_ms"]
            entry["speedup_stream"] = entry["baseline_stream_ms"] / entry["kernel_unchecked_stream_ms"]
            entry["kernel_tflops_stored"] = entry["flops_stored"] / entry["kernel_unchecked_stream_ms"] / 1e9
            entry["baseline_tflops"] = entry["flops_dense"] / entry["baseline_stream_ms"] / 1e9
            entry["kernel_x_read_tbps"] = entry["x_bytes_read"] / entry["kernel_unchecked_stream_ms"] / 1e9
    except Exception as exc:  # one failing case must not hide the others
        entry["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if "error" in entry:
        summary = f"ERROR {entry['error']}"
    elif timed:
        summary = (f"kernel {entry['kernel_unchecked_ms']:.4f} ms (checked {entry['kernel_ms']:.4f}, stream "
                   f"{entry['kernel_unchecked_stream_ms']:.4f})  baseline {entry['baseline_ms']:.4f} ms  "
                   f"speedup {entry['speedup']:.2f}x (checked {entry['speedup_checked']:.2f}x, stream "
                   f"{entry['speedup_stream']:.2f}x)")
    else:
        summary = "not timed"
    print(f"{name:26s} M={m} N={n} K={k} density={entry.get('density', 0):.3f}  {summary}  "
          f"rel_err={entry.get('rel_err')}", flush=True)
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bsr_gpu_bench.json")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU in Triton's interpreter (TRITON_INTERPRET=1), no timing")
    args = parser.parse_args()
    warmup, iters = (3, 10) if args.quick else (10, 50)
    if args.smoke:
        device, cases, timed = torch.device("cpu"), SMOKE_CASES, False
    elif torch.cuda.is_available():
        device, cases, timed = torch.device("cuda"), CASES, True
    else:
        print("no CUDA device (use --smoke with TRITON_INTERPRET=1 to check this script)", file=sys.stderr)
        return 2
    import triton

    report = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "warmup": warmup, "iters": iters, "headline_target_speedup": HEADLINE_TARGET}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report.update(device=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                      capability=list(torch.cuda.get_device_capability(device)))
    gen = torch.Generator(device=device).manual_seed(0)
    report["results"] = [run_case(case, device, gen, warmup, iters, timed) for case in cases]
    headline = report["results"][0]
    if "speedup" in headline:
        report["headline_speedup"] = headline["speedup"]
        report["headline_meets_target"] = headline["speedup"] >= HEADLINE_TARGET
        print(f"headline speedup {headline['speedup']:.2f}x (target {HEADLINE_TARGET}x): "
              f"{'met' if report['headline_meets_target'] else 'NOT met'}")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.json}")
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
