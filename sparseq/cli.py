"""The `sparseq` command: `sparseq info`, `sparseq bench int8|sparse`. The work lives in
sparseq.bench and sparseq.bench_sparse."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _int_list(text: str) -> List[int]:
    try:
        return [_positive_int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")


def _kn_list(text: str) -> List[Tuple[int, int]]:
    try:
        pairs = [part.lower().split("x") for part in text.split(",")]
        return [(_positive_int(k), _positive_int(n)) for k, n in pairs]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated KxN pairs like 4096x1024, got {text!r}")


def _float_list(text: str) -> List[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.5,0.9, got {text!r}")
    if not all(0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"sparsities must lie in [0, 1), got {text!r}")
    return values


def _block(text: str) -> Tuple[int, int]:
    try:
        bh, bw = text.lower().split("x")
        return _positive_int(bh), _positive_int(bw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block shape like 4x4, got {text!r}")


def _auto_format_policy() -> str:
    from .nn import sparse_linear as sl

    return (f"2:4 pattern -> 2:4; blocks of {', '.join(f'{h}x{w}' for h, w in sl.BSR_BLOCKS)} at least "
            f"{sl.BSR_MIN_FILL:.0%} full -> BSR; >= {sl.CSR_MIN_SPARSITY:.0%} zeros -> CSR; else dense")


def _cmd_info(args: argparse.Namespace) -> int:
    from . import bench

    info = bench.machine_info()
    features = ", ".join(name for name, present in info["cpu_features"].items() if present) or "none found"
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        cuda = f"yes ({', '.join(gpus)}; torch CUDA {torch.version.cuda})"
    else:
        cuda = "no"
    triton_ok, triton_why = bench.triton_status()
    lines = [
        ("sparseq", info["sparseq"]),
        ("torch", info["torch"]),
        ("python", info["python"]),
        ("extension", "built (sparseq._C)" if info["extension_built"]
         else f"not available: {info['extension_error']} (the pure-PyTorch reference runs instead)"),
        ("CPU", f"{info['cpu_model']} ({info['logical_cpus']} logical CPUs, "
                f"torch threads {info['threads']})"),
        ("CPU features", f"{features} (from {info['cpu_features_source']})"),
        ("CUDA archs compiled", ";".join(info["cuda_archs_compiled"]) or "none"),
        ("CUDA available", cuda),
        ("Triton", "available" if triton_ok else f"not available ({triton_why})"),
        ("SparseLinear auto", _auto_format_policy()),
    ]
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


def _no_cuda(args: argparse.Namespace) -> bool:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sparseq bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return True
    return False


def _write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


def _cmd_bench_int8(args: argparse.Namespace) -> int:
    from . import bench

    if _no_cuda(args):
        return 2
    result = bench.bench_int8(
        m_values=args.m or (bench.QUICK_M if args.quick else bench.FULL_M),
        kn_values=args.kn or (bench.QUICK_KN if args.quick else bench.FULL_KN),
        device=args.device, threads=args.threads,
        repeats=args.repeats or (bench.QUICK_REPEATS if args.quick else bench.FULL_REPEATS),
        warmup=bench.QUICK_WARMUP if args.quick else bench.FULL_WARMUP,
        allow_reference=args.allow_reference, cold=args.cold)
    machine, settings = result["machine"], result["settings"]
    where = machine.get("gpu") or machine["cpu_model"]
    print(f"int8 linear on {args.device} ({where}), {settings['threads']} threads, "
          f"median of {settings['repeats']} after {settings['warmup']} warm-up calls, "
          f"{settings['weights']} weights")
    print("x <baseline> = baseline ms / ms: above 1 is faster than that baseline\n")
    print(bench.format_table(result["rows"]))
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json:
        _write_json(args.json, result)
    return 0


def _cmd_bench_sparse(args: argparse.Namespace) -> int:
    from . import bench_sparse

    if _no_cuda(args):
        return 2

    def progress(what: str) -> None:
        print(f"  timing {what}", file=sys.stderr, flush=True)

    result = bench_sparse.bench_sparse(
        sparsities=args.sparsity or (bench_sparse.QUICK_SPARSITIES if args.quick else bench_sparse.FULL_SPARSITIES),
        patterns=args.pattern or bench_sparse.PATTERNS,
        m_values=args.m or (bench_sparse.QUICK_M if args.quick else bench_sparse.FULL_M),
        kn_values=args.kn or (bench_sparse.QUICK_KN if args.quick else bench_sparse.FULL_KN),
        device=args.device, threads=args.threads,
        repeats=args.repeats or (bench_sparse.QUICK_REPEATS if args.quick else bench_sparse.FULL_REPEATS),
        block=args.block, allow_reference=args.allow_reference, progress=None if args.no_progress else progress)
    machine, settings = result["machine"], result["settings"]
    print(f"sparse linear on {args.device} ({machine.get('gpu') or machine['cpu_model']}), "
          f"{settings['threads']} threads, {settings['dtype']}, {settings['statistic']} of "
          f"{settings['repeats']}, {settings['weights']}")
    print("a/b = b ms / a ms: above 1, a is faster than b.  t.csr = torch.sparse.mm on to_sparse_csr(), "
          "int8 = sparseq Int8Linear (dense), t.int8 = torch quantize_dynamic, sparse = SparseLinear, "
          "sp.int8 = SparseInt8Linear\n")
    print(bench_sparse.format_table(result["rows"]))
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json:
        _write_json(args.json, result)
    if args.png:
        bench_sparse.plot_speedup(result, args.png)
        print(f"wrote {args.png}")
    return 0


def _add_common_bench_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="also write the rows and machine info to PATH")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="torch.set_num_threads(N) while timing")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--m", type=_int_list, metavar="M1,M2", help="row counts M (overrides --quick)")
    parser.add_argument("--kn", type=_kn_list, metavar="KxN,...", help="weight shapes (overrides --quick)")
    parser.add_argument("--repeats", type=_positive_int, metavar="N", help="timed samples per row")
    parser.add_argument("--allow-reference", action="store_true",
                        help="without compiled kernels, time sparseq's pure-PyTorch reference (slow) "
                             "instead of leaving its rows out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseq",
                                     description="sparseq: int8 and sparse kernels for PyTorch")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser("info", help="versions, extension build, CPU features, CUDA and Triton",
                               description="Print what sparseq was built with and what this machine offers.")
    info.set_defaults(func=_cmd_info)

    bench = commands.add_parser("bench", help="time sparseq's kernels beside their baselines",
                                description="Time sparseq's kernels beside their baselines.")
    topics = bench.add_subparsers(dest="topic", metavar="TOPIC", required=True)
    int8 = topics.add_parser(
        "int8", help="int8 linear layers vs fp32, torch dynamic int8 (CPU) and bf16 (CUDA)",
        description="Time Int8Linear (8- and 7-bit activations) and Int8WeightOnlyLinear against "
                    "fp32 nn.Linear, torch's dynamic int8 Linear (CPU) and bf16 F.linear (CUDA), "
                    "for M in {1,16,128,512} and (K,N) in {(4096,4096),(1024,4096),(4096,1024)}.")
    _add_common_bench_args(int8, "M in {1,16,128}, (K,N)=(4096,4096) only, fewer repeats")
    int8.add_argument("--cold", action="store_true",
                      help="cycle through weight copies larger than twice the last-level cache "
                           "(as a model's layers do) instead of reusing one cache-hot weight")
    int8.set_defaults(func=_cmd_bench_int8)

    sparse = topics.add_parser(
        "sparse", help="sparse layers vs fp32 dense, torch CSR, int8 dense and torch dynamic int8",
        description="Time SparseLinear and SparseInt8Linear on weights pruned to a random pattern "
                    "(unstructured, 2:4, block) at sparsities {50,70,90,95}%, for M in {1,16,128,512} "
                    "and (K,N) in {(4096,4096),(384,1536),(1536,384)}, beside fp32 nn.Linear, "
                    "torch.sparse.mm on a CSR weight, sparseq's dense Int8Linear and torch's dynamic "
                    "int8 Linear, with the ratios; optionally a PNG of speedup against sparsity.")
    _add_common_bench_args(sparse, "sparsity {50,90}%%, M in {1,16,128}, (K,N)=(4096,4096), fewer repeats")
    sparse.add_argument("--sparsity", type=_float_list, metavar="S1,S2",
                        help="fractions of zeros, e.g. 0.5,0.9 (overrides --quick)")
    sparse.add_argument("--pattern", action="append", choices=("unstructured", "2:4", "block"),
                        help="patterns to time (repeatable; default: all three)")
    sparse.add_argument("--block", type=_block, default=(4, 4), metavar="BHxBW",
                        help="block shape of the block pattern (default: 4x4)")
    sparse.add_argument("--png", metavar="PATH", help="also plot speedup over fp32 against sparsity to PATH")
    sparse.add_argument("--no-progress", action="store_true", help="do not report progress on stderr")
    sparse.set_defaults(func=_cmd_bench_sparse)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
