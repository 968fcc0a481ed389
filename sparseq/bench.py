"""Measurement behind `sparseq bench`: sparseq's int8 layers beside the baselines they replace.

Every timing is the median of `repeats` samples after `warmup` calls, under torch.no_grad.
"hot" reuses one weight (it stays in cache as far as its size allows); "cold" cycles through
copies of it that together exceed twice the last-level cache, as the layers of a real model
do (int8 weights fit a cache that fp32 ones overflow, so hot numbers flatter int8 at small M,
where the weight read dominates). On CUDA a sample is
`CUDA_CALLS_PER_SAMPLE` back-to-back calls between two events, so launch gaps are measured as a
model would see them rather than one host synchronisation per call.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import math
import os
import platform
import random
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import sparseq
from . import ops
from .nn import Int8Linear, Int8StaticLinear, Int8WeightOnlyLinear

FULL_M = (1, 16, 128, 512)
FULL_KN = ((4096, 4096), (1024, 4096), (4096, 1024))
QUICK_M = (1, 16, 128)
QUICK_KN = ((4096, 4096),)
FULL_REPEATS, QUICK_REPEATS = 15, 5
FULL_WARMUP, QUICK_WARMUP = 3, 2
CUDA_CALLS_PER_SAMPLE = 20
MAX_COLD_COPIES = 1024

FP32 = "fp32 nn.Linear"
BF16 = "bf16 nn.Linear"
TORCH_INT8 = "torch dynamic int8"
# Baselines every row is compared against, in column order.
BASELINES = (FP32, TORCH_INT8, BF16)

_PROC_CPUINFO_FLAGS = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f",
                       "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "amx_int8": "amx_int8"}


def _proc_cpuinfo() -> Dict[str, str]:
    """First processor's fields from /proc/cpuinfo (empty where there is none)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_features() -> Tuple[Dict[str, bool], str]:
    """(feature -> present, where the answer came from): the extension's run-time CPUID check
    when it is built, else the kernel's flags in /proc/cpuinfo."""
    if sparseq.HAS_EXT:
        from . import _C

        return dict(_C.cpu_features()), "sparseq._C"
    flags = set(_proc_cpuinfo().get("flags", "").split())
    if not flags:
        return {}, "unknown (no extension, no /proc/cpuinfo)"
    return {name: flag in flags for name, flag in _PROC_CPUINFO_FLAGS.items()}, "/proc/cpuinfo"


def cuda_archs() -> List[str]:
    if not sparseq.HAS_EXT:
        return []
    from . import _C

    return list(_C.cuda_archs())


def triton_status() -> Tuple[bool, str]:
    """(usable, why not) for sparseq's Triton backend."""
    try:
        from . import triton as sparseq_triton
    except ImportError as exc:
        return False, f"sparseq.triton not importable: {exc}"
    if sparseq_triton.is_available():
        return True, ""
    try:
        import triton
    except ImportError:
        return False, "triton is not installed"
    return False, f"triton {triton.__version__} installed, but no CUDA GPU (TRITON_INTERPRET=1 runs the interpreter)"


def machine_info(device: Optional[torch.device] = None) -> dict:
    """What a benchmark result needs beside it to be read later."""
    features, features_source = cpu_features()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _proc_cpuinfo().get("model name") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # Timings on a busy machine mislead; the load says how busy it was.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_features": features,
        "cpu_features_source": features_source,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sparseq": sparseq.__version__,
        "extension_built": sparseq.HAS_EXT,
        "extension_error": sparseq.EXT_ERROR,
        "cuda_archs_compiled": cuda_archs(),
        "cuda_available": torch.cuda.is_available(),
    }
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
            info["gpu_capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
    return info


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of one fn() call in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(CUDA_CALLS_PER_SAMPLE):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / CUDA_CALLS_PER_SAMPLE)
    else:
        for _ in range(repeats):
            start_s = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(samples)


def time_interleaved(fns: Dict[str, Callable[[], object]], runs: int = 9, warmup: int = 2,
                     clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median time (ms) of each fn, calling them in turn every round so that drift in the
    machine's load (other processes, clocks) hits kernel and baseline alike. Each round runs
    them in another (seeded) order, so no fn always follows the same one: what a predecessor
    leaves behind (caches, the core's clock after heavy AVX-512 or AVX2 work) is spread over all.
    `clock` may be time.process_time: CPU time, which time slices lost to other processes do not
    inflate (meaningful with one thread only)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(runs):
        for name in order.sample(list(fns), len(fns)):
            start = clock()
            fns[name]()
            times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(samples) for name, samples in times.items()}


@dataclass
class Candidate:
    name: str
    backend: str  # what actually runs: "torch", "cpu"/"cuda" (compiled), "triton", "reference"
    module: nn.Module
    dtype: torch.dtype  # activation dtype it is fed


def _torch_dynamic_int8(linear: nn.Linear) -> Tuple[Optional[nn.Module], str]:
    """torch.ao's dynamic int8 Linear (fbgemm/x86 engine), or None and why not."""
    if linear.weight.device.type != "cpu":
        return None, f"{TORCH_INT8}: CPU only in torch, not timed on {linear.weight.device}"
    if torch.backends.quantized.engine == "none":
        return None, f"{TORCH_INT8}: no quantized engine in this torch build"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(nn.Sequential(copy.deepcopy(linear)), {nn.Linear},
                                    dtype=torch.qint8), ""
    except (ImportError, RuntimeError) as exc:
        return None, f"{TORCH_INT8}: unavailable ({exc})"


def candidates(linear: nn.Linear, device: torch.device,
               allow_reference: bool = False) -> Tuple[List[Candidate], List[str]]:
    """Everything timed for one weight on ``device``, baselines first; plus notes on what is not."""
    notes: List[str] = []
    cands = [Candidate(FP32, "torch", linear, torch.float32)]
    torch_int8, why_not = _torch_dynamic_int8(linear)
    if torch_int8 is not None:
        cands.append(Candidate(TORCH_INT8, "torch", torch_int8, torch.float32))
    else:
        notes.append(why_not)
    act_dtype = torch.float32
    if device.type == "cuda":
        cands.append(Candidate(BF16, "torch", copy.deepcopy(linear).to(torch.bfloat16), torch.bfloat16))
        act_dtype = torch.bfloat16

    compiled = ops.ext_supports(device)
    backend = device.type if compiled else "reference"
    if not compiled:
        missing = (f"sparseq's compiled kernels are not available for {device} "
                   f"({sparseq.EXT_ERROR or 'built without them'})")
        if not allow_reference:
            notes.append(f"{missing}: sparseq rows skipped (allow_reference / --allow-reference "
                         "times the slow pure-PyTorch reference instead)")
            return cands, notes
        notes.append(f"{missing}: sparseq rows time the pure-PyTorch reference, not a kernel")
    cands += [
        Candidate("sparseq Int8Linear (a8)", backend, Int8Linear.from_dense(linear, act_bits=8), act_dtype),
        Candidate("sparseq Int8Linear (a7)", backend, Int8Linear.from_dense(linear, act_bits=7), act_dtype),
        # Static activations: the scale a calibration on randn inputs would give (|x| <= 4).
        Candidate("sparseq Int8StaticLinear (a8)", backend,
                  Int8StaticLinear.from_dense(linear, x_scale=4.0 / 127, act_bits=8), act_dtype),
        Candidate("sparseq Int8StaticLinear (a7)", backend,
                  Int8StaticLinear.from_dense(linear, x_scale=4.0 / 63, act_bits=7), act_dtype),
        Candidate("sparseq Int8WeightOnlyLinear", backend, Int8WeightOnlyLinear.from_dense(linear),
                  act_dtype),
    ]
    if device.type == "cuda":
        usable, why_not = triton_status()
        if usable:
            cands.append(Candidate("sparseq Int8Linear (a8)", "triton",
                                   Int8Linear.from_dense(linear, backend="triton"), act_dtype))
        else:
            notes.append(f"triton rows skipped: {why_not}")
    return cands, notes


def last_level_cache_bytes(device: torch.device) -> int:
    """The GPU's L2, or the largest CPU cache Linux reports (32 MiB when it reports none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def held_bytes(module: nn.Module) -> int:
    """Bytes of the tensors a module holds: its state (torch's packed int8 weights included) and
    tensors kept as plain attributes (a CSR weight)."""
    def tensor_bytes(value) -> int:
        if isinstance(value, (tuple, list)):
            return sum(map(tensor_bytes, value))
        if not isinstance(value, torch.Tensor):
            return 0
        if value.layout == torch.sparse_csr:
            return tensor_bytes((value.crow_indices(), value.col_indices(), value.values()))
        return value.numel() * value.element_size()

    attributes = (value for sub in module.modules() for value in vars(sub).values())
    return tensor_bytes(list(module.state_dict().values())) + tensor_bytes(
        [value for value in attributes if isinstance(value, torch.Tensor)])


def cold_copies(module: nn.Module, device: torch.device) -> int:
    """How many copies of module add up to twice the last-level cache, counted in its own bytes
    (an fp32 weight needs a quarter of the copies of its int8 twin); at most MAX_COLD_COPIES,
    which bounds the set-up for toy shapes."""
    return min(MAX_COLD_COPIES, max(2, math.ceil(2 * last_level_cache_bytes(device) / max(1, held_bytes(module)))))


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free device memory, or MemAvailable of /proc/meminfo on the CPU (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_cold_fits(columns: int, device: torch.device) -> None:
    """Raise before building cold copies that would not fit: each of ``columns`` cycles through
    about twice the last-level cache (on a host with a 480 MiB L3, about 1 GiB per column)."""
    cache = last_level_cache_bytes(device)
    needed = columns * 2 * cache
    available = available_memory_bytes(device)
    if available is not None and needed > 0.8 * available:
        raise MemoryError(
            f"--cold needs about {needed / 2**30:.1f} GiB on {device.type} ({columns} timed columns, each "
            f"cycling through twice the {cache / 2**20:.0f} MiB last-level cache) "
            f"but {available / 2**30:.1f} GiB is available; time hot weights (without --cold) on this machine")


def weight_rotation(module: torch.nn.Module, copies: int) -> Iterator[torch.nn.Module]:
    """module, then copies - 1 deep copies of it, in a cycle: one call each in turn (cold), or
    the module itself every time (copies=1, hot)."""
    return itertools.cycle([module] + [copy.deepcopy(module) for _ in range(copies - 1)])


@contextlib.contextmanager
def _num_threads(threads: Optional[int]):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_int8(m_values: Sequence[int] = FULL_M, kn_values: Sequence[Tuple[int, int]] = FULL_KN,
               device: str | torch.device = "cpu", threads: Optional[int] = None,
               repeats: int = FULL_REPEATS, warmup: int = FULL_WARMUP, seed: int = 0,
               allow_reference: bool = False, cold: bool = False) -> dict:
    """Time every candidate for each (K, N) weight and each M; return {"machine", "settings",
    "rows", "notes"}. Without compiled kernels for ``device`` the sparseq rows are left out
    unless ``allow_reference`` (the reference is orders of magnitude slower). Each row has ms
    and, per baseline measured, speedup_vs_<baseline> = baseline ms / row ms (above 1: faster).
    ``cold`` cycles through cold_copies() copies of each module instead of reusing one."""
    device = torch.device(device)
    rows: List[dict] = []
    notes: List[str] = []
    with _num_threads(threads), torch.no_grad():
        torch.manual_seed(seed)
        for k, n in kn_values:
            linear = nn.Linear(k, n, device=device)
            cands, cand_notes = candidates(linear, device, allow_reference)
            if cold:
                check_cold_fits(len(cands), device)
            copies = [cold_copies(c.module, device) if cold else 1 for c in cands]
            rotations = [weight_rotation(c.module, count) for c, count in zip(cands, copies)]
            notes += [note for note in cand_notes if note not in notes]
            for m in m_values:
                x = torch.randn(m, k, device=device)
                baseline_ms: Dict[str, float] = {}
                for cand, turn, count in zip(cands, rotations, copies):
                    xc = x.to(cand.dtype)
                    ms = median_ms(lambda: next(turn)(xc), device, warmup, repeats)
                    if cand.name in BASELINES:
                        baseline_ms[cand.name] = ms
                    rows.append({"M": m, "K": k, "N": n, "impl": cand.name, "backend": cand.backend,
                                 "dtype": str(cand.dtype).replace("torch.", ""), "ms": ms,
                                 "weight_copies": count})
                for row in rows[-len(cands):]:
                    for base, base_ms in baseline_ms.items():
                        row[_speedup_key(base)] = base_ms / row["ms"]
        info = machine_info(device)
    settings = {"M": list(m_values), "KN": [list(kn) for kn in kn_values], "repeats": repeats,
                "warmup": warmup, "weights": "cold" if cold else "hot", "statistic": "median",
                "threads": info["threads"]}
    return {"machine": info, "settings": settings, "rows": rows, "notes": notes}


_SHORT_NAMES = {FP32: "fp32", TORCH_INT8: "torch_int8", BF16: "bf16"}


def _speedup_key(baseline: str) -> str:
    return "speedup_vs_" + _SHORT_NAMES[baseline]


def format_table(rows: Iterable[dict]) -> str:
    """A fixed-width text table of bench_int8's rows. Column "x fp32" is fp32 ms / row ms
    (above 1: faster than fp32), and so on per baseline; n/a where it was not measured."""
    rows = list(rows)
    baselines = [b for b in BASELINES if any(_speedup_key(b) in r for r in rows)]
    keys = [_speedup_key(b) for b in baselines]
    headers = ["M", "K", "N", "impl", "backend", "dtype", "ms"] + ["x " + _SHORT_NAMES[b] for b in baselines]
    body = [[str(r["M"]), str(r["K"]), str(r["N"]), r["impl"], r["backend"], r["dtype"], f"{r['ms']:.3f}"]
            + [f"{r[k]:.2f}" if k in r else "n/a" for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in [headers] + body) for i in range(len(headers))]
    text_cols = {3, 4, 5}

    def fmt(line):
        return "  ".join(cell.ljust(w) if i in text_cols else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(line, widths)))

    out = [fmt(headers), fmt(["-" * w for w in widths])]
    previous = None
    for r, line in zip(rows, body):
        if previous is not None and (r["M"], r["K"], r["N"]) != previous:
            out.append("")
        previous = (r["M"], r["K"], r["N"])
        out.append(fmt(line))
    return "\n".join(out)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the PNG plot needs matplotlib (pip install matplotlib)") from exc
    return plt


def plot_speedup(result: dict, path: str) -> None:
    """PNG: speedup over fp32 nn.Linear against M (log scale), one line per sparseq
    implementation and torch baseline, one panel per (K, N) weight."""
    plt = pyplot()
    rows = [r for r in result["rows"] if r["impl"] != FP32 and _speedup_key(FP32) in r]
    if not rows:
        raise ValueError("no timings beside fp32 to plot")
    shapes = sorted({(r["K"], r["N"]) for r in rows}, key=lambda kn: -kn[0] * kn[1])
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, (k, n) in zip(axes[0], shapes):
        for impl, backend in dict.fromkeys((r["impl"], r["backend"]) for r in rows):
            points = sorted((r["M"], r[_speedup_key(FP32)]) for r in rows
                            if (r["K"], r["N"], r["impl"], r["backend"]) == (k, n, impl, backend))
            style = "--" if backend == "torch" else "-o"
            label = impl if backend in ("torch", "cpu", "cuda") else f"{impl} [{backend}]"
            ax.plot(*zip(*points), style, label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        m_values = sorted({r["M"] for r in rows})
        ax.set_xticks(m_values, [str(m) for m in m_values])
        ax.minorticks_off()
        ax.set_title(f"K={k}, N={n}")
        ax.set_xlabel("M (rows of the input)")
        ax.set_ylabel("speedup over fp32 nn.Linear")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    machine, settings = result["machine"], result["settings"]
    fig.suptitle(f"sparseq int8 linear, {machine.get('gpu') or machine.get('cpu_model')}, "
                 f"{settings['threads']} threads, {settings['weights']} weights", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
