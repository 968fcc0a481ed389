"""CPU sparse kernel benchmark: sparse_csr_linear / sparse24_linear beside dense and torch
baselines, interleaved in one process.

    python bench/bench_sparse_kernels.py [--threads 2] [--runs 15] [--m 1 16 128 512]
        [--k 4096] [--n 4096] [--cases csr90 csr70 csr90_int8 24] [--clock wall|thread]

Baselines (same run, alternating call by call): fp32 F.linear (dense), torch CSR
(torch.sparse.mm(w.to_sparse_csr(), x.T).T, no bias) and, for int8 values, torch.ao quantize_dynamic
(fbgemm). The weight is random with a random unstructured pattern (2:4: the 2 largest of every 4),
hot in cache. measure() returns one dict per case and is importable.

--clock thread (with --threads 1) times each call by the CPU time of the calling thread
(time.thread_time) instead of wall time: on a machine shared with other busy processes a parallel
region waits for descheduled threads, which swamps wall times of millisecond calls; CPU time of a
single thread is insensitive to that (not to shared caches or an SMT sibling's load).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_int8_kernels import _quantize_dynamic, time_interleaved  # noqa: E402

import sparseq  # noqa: E402
from sparseq import ops  # noqa: E402
from sparseq.formats import Sparse24Weight, SparseCSRWeight  # noqa: E402

CASES = {
    # name: (kind, sparsity, int8 values)
    "csr90": ("csr", 0.9, False),
    "csr70": ("csr", 0.7, False),
    "csr90_int8": ("csr", 0.9, True),
    "24": ("24", 0.5, False),
}


def random_sparse_weight(kind: str, sparsity: float, n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    if kind == "24":
        groups = -(-k // 4)
        padded = torch.zeros(n, groups * 4)
        padded[:, :k] = w
        g = padded.view(n, groups, 4)
        keep = g.abs().topk(2, dim=2).indices
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(2, keep, True)
        return (g * mask).view(n, groups * 4)[:, :k].contiguous()
    return w * (torch.rand(n, k, generator=gen) >= sparsity)


@torch.inference_mode()
def measure(kind: str, sparsity: float, m: int, k: int, n: int, *, int8: bool = False,
            dtype: torch.dtype = torch.float32, runs: int = 15, threads: int | None = 2,
            clock: str = "wall") -> dict:
    """Median ms of the sparseq kernel and its baselines on one shape, with the speedups."""
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    if clock == "thread" and torch.get_num_threads() != 1:
        raise ValueError("clock='thread' measures the calling thread only: use threads=1")
    w = random_sparse_weight(kind, sparsity, n, k)
    bias = torch.randn(n) * 0.1
    x = torch.randn(m, k).to(dtype)
    w_dense, bias_dense = w.to(dtype), bias.to(dtype)
    fns = {"dense": lambda: F.linear(x, w_dense, bias_dense)}
    if kind == "24":
        packed = Sparse24Weight.pack(w, int8=int8)
        fns["sparseq"] = lambda: ops.sparse24_linear(x, packed.values, packed.meta, packed.scale, bias)
    else:
        packed = SparseCSRWeight.pack(w, int8=int8)
        fns["sparseq"] = lambda: ops.sparse_csr_linear(x, packed.seg_ptr, packed.col_offsets, packed.values,
                                                       packed.scale, bias)
        if dtype == torch.float32:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                w_csr = w.to_sparse_csr()
            # Without its bias: a lower bound on torch CSR's time, so the ratio is conservative.
            fns["torch_csr"] = lambda: torch.sparse.mm(w_csr, x.T).T
    if int8 and dtype == torch.float32:
        linear = torch.nn.Linear(k, n)
        linear.weight.data.copy_(w)
        linear.bias.data.copy_(bias)
        qdyn = _quantize_dynamic(linear)
        fns["qdyn"] = lambda: qdyn(x)
    t = time_interleaved(fns, runs=runs, warmup=2, clock=time.perf_counter if clock == "wall" else time.thread_time)
    row = {"kind": kind, "sparsity": sparsity, "int8": int8, "dtype": str(dtype).replace("torch.", ""),
           "m": m, "k": k, "n": n, "threads": torch.get_num_threads(), "clock": clock,
           "weight_bytes": packed.nbytes}
    row.update({f"{name}_ms": round(ms, 4) for name, ms in t.items()})
    for name in t:
        if name != "sparseq":
            row[f"vs_{name}"] = round(t[name] / t["sparseq"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 512])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--clock", default="wall", choices=["wall", "thread"])
    args = parser.parse_args()
    if not sparseq.HAS_EXT:
        raise SystemExit(f"sparseq extension not built ({sparseq.EXT_ERROR})")
    for case in args.cases:
        kind, sparsity, int8 = CASES[case]
        for m in args.m:
            row = measure(kind, sparsity, m, args.k, args.n, int8=int8, runs=args.runs, threads=args.threads,
                          clock=args.clock)
            times = "  ".join(f"{key[:-3]} {val:8.3f} ms" for key, val in row.items() if key.endswith("_ms"))
            ratios = "  ".join(f"{key} {val:5.2f}x" for key, val in row.items() if key.startswith("vs_"))
            print(f"{case:11s} M={m:<4d} K={args.k} N={args.n} threads={args.threads} {args.clock}  {times}  |  "
                  f"{ratios}", flush=True)


if __name__ == "__main__":
    main()
