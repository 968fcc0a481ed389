"""CPU block-sparse kernel benchmark: sparseq bsr_linear beside dense and sparse PyTorch, same run.

    python bench/bench_bsr_kernels.py [--threads 2] [--runs 9] [--m 1 16 128]
        [--blocks 1x8 4x4 16x16 32x32] [--sparsity 0.5 0.7 0.9] [--values fp32 int8]

For each M, the baselines are timed interleaved with every kernel variant (alternating calls,
median of `runs`): torch fp32 F.linear on the dense weight, sparseq's dense int8 path
(sparseq.ops.int8_linear) and torch's BSR tensor (w.to_sparse_bsr(block) @ x.T) where torch
supports it on CPU. Weights are K = N = 4096 with whole blocks zeroed at random (the pattern a
block pruner leaves); the weights of all variants stay in one process, so each call finds its
weight wherever the calls in between left it (mostly evicted by the 64 MiB dense weight).
Speedups are versus fp32 F.linear.

--clock cpu times CPU time (time.process_time) instead of wall time, with --threads 1: on a
machine shared with other busy processes, a 2-thread parallel region waits milliseconds for
its second thread to be scheduled (seen as a floor of ~8 ms under every fast kernel on the
shared 2-core development machine), which swamps sub-millisecond kernels; CPU time does not.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

import sparseq
from sparseq import ops
from sparseq.formats import BlockSparseWeight, PackedInt8Weight

from bench_int8_kernels import time_interleaved

K = N = 4096
VALUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}


def block_sparse_weight(block: tuple[int, int], sparsity: float, gen: torch.Generator) -> torch.Tensor:
    bh, bw = block
    keep = torch.rand(N // bh, K // bw, generator=gen) >= sparsity
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return torch.randn(N, K, generator=gen) * mask


def torch_bsr_or_none(w: torch.Tensor, block: tuple[int, int]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            w_bsr = w.to_sparse_bsr(block)
            _ = w_bsr @ torch.zeros(K, 1)
            return w_bsr
        except (RuntimeError, NotImplementedError):
            return None


def bsr_call(bsr: BlockSparseWeight, x: torch.Tensor):
    return lambda: ops.bsr_linear(x, bsr.block_row_ptr, bsr.block_col_idx, bsr.values, bsr.scale, None,
                                  out_features=N)


def bench_bsr(ms, blocks, sparsities, values, runs: int, clock=time.perf_counter,
              torch_bsr: bool = True) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(N, K, generator=gen)
    packed = PackedInt8Weight.pack(dense)
    rows = []
    for m in ms:
        x = torch.randn(m, K, generator=gen)
        fns = {"fp32 F.linear (dense)": lambda: F.linear(x, dense),
               "sparseq int8_linear (dense)": lambda: ops.int8_linear(x, packed.packed, packed.scale,
                                                                       packed.rowsum, None, in_features=K)}
        for block in blocks:
            for sparsity in sparsities:
                w = block_sparse_weight(block, sparsity, gen)
                label = f"{block[0]}x{block[1]} {sparsity:.0%}"
                for name in values:
                    bsr = BlockSparseWeight.pack(w, block, dtype=VALUE_DTYPES[name], int8=name == "int8")
                    fns[f"sparseq bsr {label} {name}"] = bsr_call(bsr, x)
                w_bsr = torch_bsr_or_none(w, block) if torch_bsr else None
                if w_bsr is not None:
                    fns[f"torch BSR {label} fp32"] = (lambda wb: lambda: wb @ x.T)(w_bsr)
        times = time_interleaved(fns, runs=runs, warmup=2, clock=clock)
        base = times["fp32 F.linear (dense)"]
        for impl, t in times.items():
            rows.append({"m": m, "impl": impl, "ms": round(t, 4), "vs_fp32_dense": round(base / t, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--blocks", nargs="+", default=["1x8", "4x4", "16x16", "32x32"])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--values", nargs="+", default=["fp32", "int8"], choices=sorted(VALUE_DTYPES))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--no-torch-bsr", action="store_true", help="skip torch's BSR baseline (slow)")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (CPU time sums over threads)")
    if not sparseq.HAS_EXT:
        raise SystemExit(f"sparseq's compiled extension is not available: {sparseq.EXT_ERROR}")
    torch.set_num_threads(args.threads)
    blocks = [tuple(int(v) for v in b.split("x")) for b in args.blocks]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} threads, K=N={K}, runs={args.runs}, {args.clock} clock")
    print(f"{'M':>4} {'impl':<40} {'ms':>9} {'vs fp32 dense':>14}")
    with torch.no_grad():
        for row in bench_bsr(args.m, blocks, args.sparsity, args.values, args.runs, clock, not args.no_torch_bsr):
            print(f"{row['m']:>4} {row['impl']:<40} {row['ms']:>9.3f} {row['vs_fp32_dense']:>13.2f}x")


if __name__ == "__main__":
    main()
