"""The `sparseq` command: `sparseq info`, `sparseq compress`, `sparseq inspect` and
`sparseq bench int8|sparse|model`. The work lives in sparseq.bench, sparseq.bench_sparse,
sparseq.bench_model (measurement), sparseq.models (what MODEL and DATA arguments name),
sparseq.compress and sparseq.serialization.

Input the user can get wrong (missing or unreadable files, unknown recipes, data that does not fit
the model, corrupted sparseq files) ends the command with a one-line message on stderr and exit
code 2, as argparse does for bad options; SPARSEQ_TRACEBACK=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

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
    from . import bench, ops

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
        ("SparseInt8 W8A8", "act_bits=8/7: sliced ELL (fast kernel on this CPU)" if ops.cpu_has_sell_kernel() else
         "act_bits=8/7: 2:4 pattern -> 2:4, else sliced ELL (AVX2 kernel, or a portable loop without AVX2, "
         "on this CPU: no AVX-512 VBMI2 + VNNI; act_bits=None is faster here)"),
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


def _finish_bench(args: argparse.Namespace, result: dict, table: str, plot: Callable[[dict, str], None]) -> None:
    """Print a bench's table and notes; write its JSON and PNG where asked."""
    print(table)
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json:
        _write_json(args.json, result)
    if args.png:
        plot(result, args.png)
        print(f"wrote {args.png}")


def _output_path(path: str, option: str) -> str:
    """``path`` ready to be written (its folder made), checked before any long work starts."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a folder; give a file name")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def _check_png(args: argparse.Namespace) -> None:
    """Refuse --png before the timing when matplotlib is missing, not after."""
    if getattr(args, "png", None):
        from .bench import pyplot

        pyplot()
        _output_path(args.png, "--png")


def _cmd_bench_int8(args: argparse.Namespace) -> int:
    from . import bench

    if _no_cuda(args):
        return 2
    _check_png(args)
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
    _finish_bench(args, result, bench.format_table(result["rows"]), bench.plot_speedup)
    return 0


def _cmd_bench_sparse(args: argparse.Namespace) -> int:
    from . import bench_sparse

    if _no_cuda(args):
        return 2
    _check_png(args)

    def progress(what: str) -> None:
        print(f"  timing {what}", file=sys.stderr, flush=True)

    result = bench_sparse.bench_sparse(
        sparsities=args.sparsity or (bench_sparse.QUICK_SPARSITIES if args.quick else bench_sparse.FULL_SPARSITIES),
        patterns=args.pattern or bench_sparse.PATTERNS,
        m_values=args.m or (bench_sparse.QUICK_M if args.quick else bench_sparse.FULL_M),
        kn_values=args.kn or (bench_sparse.QUICK_KN if args.quick else bench_sparse.FULL_KN),
        device=args.device, threads=args.threads,
        repeats=args.repeats or (bench_sparse.QUICK_REPEATS if args.quick else bench_sparse.FULL_REPEATS),
        block=args.block, allow_reference=args.allow_reference, progress=None if args.no_progress else progress,
        cold=args.cold)
    machine, settings = result["machine"], result["settings"]
    print(f"sparse linear on {args.device} ({machine.get('gpu') or machine['cpu_model']}), "
          f"{settings['threads']} threads, {settings['dtype']}, {settings['statistic']} of "
          f"{settings['repeats']}, {settings['weights']}")
    print("a/b = b ms / a ms: above 1, a is faster than b.  t.csr = torch.sparse.mm on to_sparse_csr(), "
          "int8 = sparseq Int8Linear (dense), t.int8 = torch quantize_dynamic, sparse = SparseLinear, "
          "sp.int8 = SparseInt8Linear (float activations), sp.w8a8 = SparseInt8Linear(act_bits=8)\n")
    _finish_bench(args, result, bench_sparse.format_table(result["rows"]), bench_sparse.plot_speedup)
    return 0


# ---------------------------------------------------------------------------------------------
# sparseq compress / bench model: a model, its data, recipes


def _recipe_label(recipe: str) -> str:
    from .recipes import PRESETS

    return recipe if recipe in PRESETS else os.path.basename(recipe)


def _model_and_data(args: argparse.Namespace, progress: bool):
    """(LoadedModel, calibration batches or None, training (inputs, None) pairs or None)."""
    from . import models

    loaded = models.load_model(args.model, progress)
    if args.calib:
        calib = models.load_batches(args.calib, loaded, args.batch_size, args.seq_len, progress, "--calib")
    elif loaded.kind == "demo":
        calib = models.demo_batches(loaded.model, args.batch_size, args.seq_len)
    else:
        calib = None
    train = None
    if args.train:
        train = models.as_training_pairs(
            models.load_batches(args.train, loaded, args.batch_size, args.seq_len, progress, "--train"))
    return loaded, calib, train


def _check_recipe(recipe: str, calib: Any, train: Any) -> None:
    """Refuse an unknown recipe, or one lacking the data it needs, before the model is touched."""
    from .recipes import check_inputs, load_recipe

    steps = load_recipe(recipe)
    try:
        check_inputs(steps, calib is not None, train is not None, False)
    except ValueError as exc:
        raise ValueError(f"--recipe {recipe}: {exc} (on the command line: --calib DATA, and --train DATA "
                         "for training)") from None


def _cmd_compress(args: argparse.Namespace) -> int:
    import sparseq
    from . import bench, bench_model
    from .recipes import load_recipe

    load_recipe(args.recipe)  # an unknown preset or a bad YAML file fails before any loading
    out = _output_path(args.out, "--out")
    for option, given in (("MODEL", args.model), ("--calib", args.calib), ("--train", args.train),
                          ("--recipe", args.recipe), ("--json", args.json)):
        if given and os.path.exists(out) and os.path.exists(given) and os.path.samefile(out, given):
            raise ValueError(f"--out {out} is the {option} file: writing it would destroy it")
    if args.json:
        _output_path(args.json, "--json")
    show = not args.no_progress
    with bench._num_threads(args.threads):
        loaded, calib, train = _model_and_data(args, show)
        _check_recipe(args.recipe, calib, train)
        # The dense outputs are the quality reference; computing them first also checks that
        # the data fits the model before anything is compressed.
        reference = bench_model.model_outputs(loaded.model, calib, progress=show) if calib else None
        dense = copy.deepcopy(loaded.model)
        model = sparseq.compress(loaded.model, args.recipe, calib_data=calib, train_data=train, progress=show)
        sparseq.save(model, out)
        sides = bench_model.before_after(dense, model, os.path.getsize(out), calib, reference,
                                         runs=args.runs, progress=show)
    print(f"model:  {loaded.describe()}")
    print(f"recipe: {_recipe_label(args.recipe)}")
    print(model.sparseq_report.table())
    print()
    print(bench_model.format_before_after(sides))
    if calib is None:
        print("note: no calibration data (--calib DATA), so latency and quality were not measured")
    else:
        print(f"latency: median of {args.runs} interleaved runs on one calibration batch; quality: the "
              f"outputs on {len(calib)} calibration batches")
    print(f"wrote {out}")
    if args.json:
        _write_json(args.json, {"model": args.model, "model_kind": loaded.kind, "recipe": args.recipe,
                                "steps": model.sparseq_recipe, "out": out,
                                "report": model.sparseq_report.lines, **sides,
                                "settings": {"runs": args.runs, "calib_batches": len(calib) if calib else 0,
                                             "batch_size": args.batch_size, "seq_len": args.seq_len},
                                "machine": bench.machine_info()})
    return 0


def _presets_without_training() -> List[str]:
    from .recipes import PRESETS, load_recipe

    return [name for name in PRESETS if all(step.kind != "distill" for step in load_recipe(name))]


def _cmd_bench_model(args: argparse.Namespace) -> int:
    from . import bench, bench_model

    show = not args.no_progress
    _check_png(args)
    if args.json:
        _output_path(args.json, "--json")
    with bench._num_threads(args.threads):
        loaded, calib, train = _model_and_data(args, show)
        if calib is None:
            raise ValueError(f"{args.model}: bench model needs inputs to time: give --calib DATA")
        recipes = args.recipe or _presets_without_training()
        for recipe in recipes:
            _check_recipe(recipe, calib, train)
        result = bench_model.bench_model(loaded.model, recipes, calib, train, runs=args.runs, progress=show,
                                         labels=[_recipe_label(recipe) for recipe in recipes])
    result["settings"]["model"] = args.model
    print(f"model: {loaded.describe()}; latency on one calibration batch "
          f"({result['settings']['latency_batch']}), median of {args.runs} interleaved runs, "
          f"{result['settings']['threads']} threads")
    print("speedup = dense ms / ms; size: fp32 tensors (dense) or the sparseq file; quality: outputs on "
          f"{len(calib)} calibration batches against the dense model's\n")
    _finish_bench(args, result, bench_model.format_bench_table(result["rows"]), bench_model.plot_latency)
    return 0 if len(result["rows"]) > 1 else 2


# ---------------------------------------------------------------------------------------------
# sparseq inspect


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .serialization import format_inspection, inspect_file

    info = inspect_file(args.path, verify=args.verify)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _add_cold_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cold", action="store_true",
                        help="cycle through weight copies larger than twice the last-level cache "
                             "(as a model's layers do) instead of reusing one cache-hot weight")


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

    from .recipes import PRESETS

    compress = commands.add_parser(
        "compress", help="compress a model with a recipe, save it, print before / after",
        description=_COMPRESS_DESCRIPTION,
        epilog=_MODEL_EPILOG + f"R is a preset ({', '.join(PRESETS)}) or a YAML recipe\n"
                               "file (every step's options: sparseq/recipes.py).\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(compress)
    compress.add_argument("--recipe", required=True, metavar="R", help="a preset name or a YAML recipe file")
    compress.add_argument("--out", required=True, metavar="PATH", help="the sparseq file to write (.safetensors)")
    compress.add_argument("--json", metavar="PATH", help="also write the table's numbers to PATH")
    compress.set_defaults(func=_cmd_compress)

    inspect = commands.add_parser(
        "inspect", help="what a file written by sparseq.save holds",
        description="Print what a sparseq file holds (format and versions, recipe, architecture, every "
                    "sparseq layer's class, format, shape and bytes), read from its header.")
    inspect.add_argument("path", metavar="PATH", help="a file written by sparseq.save or sparseq compress")
    inspect.add_argument("--verify", action="store_true",
                         help="also read every tensor and check it against its SHA-256")
    inspect.add_argument("--json", action="store_true", help="print the details as JSON instead")
    inspect.set_defaults(func=_cmd_inspect)

    bench = commands.add_parser("bench", help="time sparseq's kernels beside their baselines",
                                description="Time sparseq's kernels beside their baselines.")
    topics = bench.add_subparsers(dest="topic", metavar="TOPIC", required=True)
    int8 = topics.add_parser(
        "int8", help="int8 linear layers vs fp32, torch dynamic int8 (CPU) and bf16 (CUDA)",
        description="Time Int8Linear (8- and 7-bit activations) and Int8WeightOnlyLinear against "
                    "fp32 nn.Linear, torch's dynamic int8 Linear (CPU) and bf16 F.linear (CUDA), "
                    "for M in {1,16,128,512} and (K,N) in {(4096,4096),(1024,4096),(4096,1024)}.")
    _add_common_bench_args(int8, "M in {1,16,128}, (K,N)=(4096,4096) only, fewer repeats")
    _add_cold_arg(int8)
    int8.add_argument("--png", metavar="PATH", help="also plot speedup over fp32 against M to PATH")
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
    _add_cold_arg(sparse)
    sparse.add_argument("--png", metavar="PATH", help="also plot speedup over fp32 against sparsity to PATH")
    sparse.add_argument("--no-progress", action="store_true", help="do not report progress on stderr")
    sparse.set_defaults(func=_cmd_bench_sparse)

    model = topics.add_parser(
        "model", help="a whole model: dense vs compressed with each recipe",
        description="""\
Compress copies of MODEL with each recipe and time them beside the dense model on one
calibration batch (median of interleaved runs): speedups, saved file sizes, and the mean
cosine / SQNR of each copy's outputs to the dense model's on the calibration batches.""",
        epilog=_MODEL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(model)
    model.add_argument("--recipe", action="append", metavar="R",
                       help="a preset or a YAML recipe file (repeatable; default: every preset without a "
                            "distill step)")
    model.add_argument("--json", metavar="PATH", help="also write the rows and machine info to PATH")
    model.add_argument("--png", metavar="PATH", help="also write a bar chart of the latencies to PATH")
    model.set_defaults(func=_cmd_bench_model)
    return parser


_COMPRESS_DESCRIPTION = """\
Run sparseq.compress(MODEL, R) on the calibration (and training) data, save the result with
sparseq.save to PATH (the recipe recorded in it) and print the dense and compressed model side
by side: parameters (and nonzero ones), bytes (the fp32 tensors vs the saved file), latency on
one calibration batch (median of interleaved runs) with the speedup, and the mean cosine / SQNR
of the compressed model's outputs to the dense model's on the calibration batches (for a
transformers model, the last hidden state)."""

_MODEL_EPILOG = """\
MODEL is one of:
  demo          a small built-in model (a 2-layer BERT encoder with fixed random weights when
                transformers is installed, else an MLP); DATA may be left out: it brings random
                calibration batches
  FOLDER        a transformers model folder (config.json, weights, tokenizer), loaded with
                AutoModel.from_pretrained from local files only (nothing is downloaded)
  FILE          a model saved whole with torch.save(model, FILE). Reading it unpickles it
                (torch.load(weights_only=False)), which can run any code the file holds: give
                only your own files. A .safetensors file written by sparseq.save is already
                compressed: see it with `sparseq inspect FILE`, load it with sparseq.load.
DATA is, for a transformers folder, a text file (one text per line; tokenized in batches with
the folder's tokenizer, padded, truncated to --seq-len) or a tensor file; for other models a
tensor [N, ...] of N inputs saved with torch.save (read with weights_only=True) or a
.safetensors file holding it as "inputs", split into batches of --batch-size.
"""


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from .bench_model import DEFAULT_RUNS

    parser.add_argument("model", metavar="MODEL", help="'demo', a transformers model folder, or a file "
                                                        "saved with torch.save(model, FILE) (see below)")
    parser.add_argument("--calib", metavar="DATA", help="calibration inputs (see below)")
    parser.add_argument("--train", metavar="DATA",
                        help="inputs a distill step trains on (default: the calibration inputs)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                        help="inputs per batch (default: 8)")
    parser.add_argument("--seq-len", type=_positive_int, default=128, metavar="N",
                        help="tokens per text at most, and the demo BERT's sequence length (default: 128)")
    parser.add_argument("--runs", type=_positive_int, default=DEFAULT_RUNS, metavar="N",
                        help=f"timed runs per model; the median is reported (default: {DEFAULT_RUNS})")
    parser.add_argument("--threads", type=_positive_int, metavar="N", help="torch.set_num_threads(N) meanwhile")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


# Errors that mean bad input (files, recipes, data) or a machine too small for the request, not
# a bug: a message, not a traceback.
_INPUT_ERRORS = (ValueError, OSError, ImportError, MemoryError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _INPUT_ERRORS as exc:
        if os.environ.get("SPARSEQ_TRACEBACK", "0") not in ("", "0"):
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "topic", None))))
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"sparseq {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
