"""GPU benchmark: sparseq's CUDA sparse kernels beside dense cuBLAS and torch's own 2:4 path.

    python3 bench/bench_sparse_gpu.py --json gpu_sparse_bench.json [--quick] [--headline]

Timing and reporting as in bench_int8_gpu.py (CUDA events, median; speedup = baseline_ms /
kernel_ms, > 1: sparseq is faster; each case also checks the answer against the baseline):
  * sparse24_linear bf16   vs F.linear bf16 on the same (2:4-masked) dense weight, and vs
                           torch.sparse.to_sparse_semi_structured (cuSPARSELt / CUTLASS), at
                           N = K = 4096, M in {1, 16, 128, 4096} (the target: >= 1.3x dense at 4096^3)
  * sparse24_int8_linear   vs F.linear bf16 at M in {16, 4096}
  * sparse_csr_linear bf16 vs F.linear bf16 at 90% and 95% zeros, M in {1, 16}
The ops read a device error flag after each call (a sync, see csrc/cuda/device_error_flag.h);
SPARSEQ_CUDA_CONTENT_CHECKS=0 switches that read off, which --headline runs measure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_int8_gpu import device_report, rel_err, run_case  # noqa: E402


def two_four_weight(n: int, k: int, gen: torch.Generator, dev) -> torch.Tensor:
    """A random weight with the 2 largest of every 4 kept (magnitude pruning)."""
    w = torch.randn(n, k, device=dev, generator=gen) / 64
    groups = w.view(n, k // 4, 4)
    keep = groups.abs().topk(2, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
    return (groups * mask).view(n, k)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_sparse_bench.json")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--headline", action="store_true", help="only the 2:4 bf16 cases at M=4096 and M=16")
    args = parser.parse_args()
    warmup, iters = (3, 10) if args.quick else (10, 30)

    from sparseq.formats import Sparse24Weight, SparseCSRWeight

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    report = device_report(warmup, iters)
    report["content_checks"] = os.environ.get("SPARSEQ_CUDA_CONTENT_CHECKS", "1") != "0"
    cuda_ok = report["sparseq_cuda_kernels"]
    results = report["results"]
    if not cuda_ok:
        print("sparseq was built without CUDA kernels", file=sys.stderr)
        return 2
    gen = torch.Generator(device=dev).manual_seed(0)
    n = k = 4096
    bias = torch.randn(n, device=dev, generator=gen).to(torch.bfloat16)

    w24 = two_four_weight(n, k, gen, dev).to(torch.bfloat16)
    s24 = Sparse24Weight.pack(w24)
    try:
        from torch.sparse import to_sparse_semi_structured

        w_semi = to_sparse_semi_structured(w24)
    except Exception as exc:  # no cuSPARSELt/CUTLASS build or unsupported device: skip that baseline
        w_semi = None
        print(f"torch semi-structured baseline unavailable: {type(exc).__name__}: {exc}")
    for m in ((16, 4096) if args.headline else (1, 16, 128, 4096)):
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        shape = {"M": m, "N": n, "K": k, "dtype": "bfloat16", "flops": 2 * m * n * k}
        kernel = lambda x=x: torch.ops.sparseq.sparse24_linear(x, s24.values, s24.meta, None, bias)  # noqa: E731
        run_case(results, "sparse24 bf16 vs dense bf16", shape, kernel,
                 lambda x=x: F.linear(x, w24, bias), rel_err, warmup, iters)
        if w_semi is not None and m >= 32:  # cuSPARSELt wants M >= 32 rows of the dense operand
            run_case(results, "sparse24 bf16 vs torch 2:4", shape, kernel,
                     lambda x=x: F.linear(x, w_semi, bias), rel_err, warmup, iters)
    if args.headline:
        return write(report, args.json)

    w24f = w24.float()
    q24 = Sparse24Weight.pack(w24f, int8=True)
    for m in (16, 4096):
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        run_case(results, "sparse24 int8 W8A8 vs bf16", {"M": m, "N": n, "K": k, "flops": 2 * m * n * k},
                 lambda x=x: torch.ops.sparseq.sparse24_int8_linear(x, q24.values, q24.meta, q24.scale, bias, 127),
                 lambda x=x: F.linear(x, w24, bias), rel_err, warmup, iters)

    for sparsity in (0.9, 0.95):
        w = torch.randn(n, k, device=dev, generator=gen) / 64
        w[torch.rand(n, k, device=dev, generator=gen) < sparsity] = 0
        w = w.to(torch.bfloat16)
        csr = SparseCSRWeight.pack(w)
        for m in (1, 16):
            x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
            run_case(results, f"csr {int(sparsity * 100)}% bf16 vs dense", {"M": m, "N": n, "K": k},
                     lambda x=x, c=csr: torch.ops.sparseq.sparse_csr_linear(x, c.seg_ptr, c.col_offsets, c.values,
                                                                           None, bias),
                     lambda x=x, w=w: F.linear(x, w, bias), rel_err, warmup, iters)
    return write(report, args.json)


def write(report: dict, path: str) -> int:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
