"""Measurement behind `sparseq bench sparse`: sparse layers beside the baselines a user has.

For every weight shape, pattern ("unstructured", "2:4", "block") and sparsity, a random weight is
pruned to that pattern and timed, for every M, as:
  fp32 nn.Linear          the dense layer (the unpruned shape: what pruning alone leaves you)
  torch CSR               torch.sparse.mm on weight.to_sparse_csr() (torch's own sparse path)
  sparseq int8 dense      sparseq.nn.Int8Linear (the dense int8 kernel)
  torch dynamic int8      torch.ao quantize_dynamic (fbgemm), the baseline of sparse int8
  sparseq sparse          SparseLinear in the pattern's format (csr / 2:4 / bsr)
  sparseq sparse int8     SparseInt8Linear in the same format (weight-only: float activations)
  sparseq sparse w8a8     SparseInt8Linear with act_bits=8, format "auto" (sliced ELL; 2:4 for a
                          2:4 weight where sliced ELL's CPU kernel does not run): int8
                          activations, like torch's dynamic int8
The candidates of one (shape, pattern, sparsity, M) are timed interleaved, one call each per round,
so the machine's drift hits them alike; a row holds their medians and the ratios between them.
Weights are hot (one module per column, reused) unless ``cold``. Where the last-level cache holds
the fp32 weight (a 300 MiB L3 against 64 MiB at 4096x4096), hot dense decode reads it from that
cache; a model's layers come from memory.
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import ops
from .bench import (_num_threads, _torch_dynamic_int8, check_cold_fits, cold_copies, machine_info, median_ms,
                    pyplot, time_interleaved, weight_rotation)
from .nn import Int8Linear, SparseInt8Linear, SparseLinear

PATTERNS = ("unstructured", "2:4", "block")
FULL_SPARSITIES = (0.5, 0.7, 0.9, 0.95)
FULL_M = (1, 16, 128, 512)
FULL_KN = ((4096, 4096), (384, 1536), (1536, 384))
QUICK_SPARSITIES = (0.5, 0.9)
QUICK_M = (1, 16, 128)
QUICK_KN = ((4096, 4096),)
FULL_REPEATS, QUICK_REPEATS = 9, 5
DEFAULT_BLOCK = (4, 4)

FP32 = "fp32"
TORCH_CSR = "torch_csr"
INT8_DENSE = "sparseq_int8_dense"
TORCH_INT8 = "torch_int8"
SPARSE = "sparse"
SPARSE_INT8 = "sparse_int8"
SPARSE_W8A8 = "sparse_w8a8"
COLUMNS = (FP32, TORCH_CSR, INT8_DENSE, TORCH_INT8, SPARSE, SPARSE_INT8, SPARSE_W8A8)
SPARSEQ_PATTERN_COLUMNS = (SPARSE, SPARSE_INT8, SPARSE_W8A8)  # built for each pattern, beside TORCH_CSR
# (kernel, baseline) pairs whose ratio baseline_ms / kernel_ms each row reports.
RATIOS = ((SPARSE, FP32), (SPARSE, TORCH_CSR), (SPARSE, INT8_DENSE), (SPARSE_INT8, TORCH_INT8),
          (SPARSE_INT8, FP32), (SPARSE_W8A8, TORCH_INT8), (SPARSE_W8A8, INT8_DENSE))


def prune_to(weight: torch.Tensor, pattern: str, sparsity: float, block: Tuple[int, int],
             generator: torch.Generator) -> torch.Tensor:
    """``weight`` with a random ``pattern`` of zeros: unstructured (each entry dropped with
    probability ``sparsity``), 2:4 (2 random survivors per group of 4; sparsity is 50%), or
    block (whole ``block``-shaped tiles dropped with probability ``sparsity``)."""
    n, k = weight.shape
    if pattern == "unstructured":
        keep = torch.rand(n, k, generator=generator) >= sparsity
    elif pattern == "2:4":
        groups = -(-k // 4)
        scores = torch.rand(n, groups, 4, generator=generator)
        keep = torch.zeros(n, groups, 4, dtype=torch.bool).scatter_(2, scores.topk(2, dim=2).indices, True)
        keep = keep.view(n, groups * 4)[:, :k]
    elif pattern == "block":
        bh, bw = block
        tiles = torch.rand(-(-n // bh), -(-k // bw), generator=generator) >= sparsity
        keep = tiles.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k]
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    return weight * keep.to(weight.device)


class TorchCSRLinear(nn.Module):
    """What a torch user has for a pruned weight: torch.sparse.mm on a CSR copy."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.sparse.mm(self.weight, x.t()).t()
        return out if self.bias is None else out + self.bias

    def __deepcopy__(self, memo) -> "TorchCSRLinear":
        # copy.deepcopy cannot reach a CSR tensor's storage; clone() copies its three arrays.
        twin = TorchCSRLinear.__new__(TorchCSRLinear)
        nn.Module.__init__(twin)
        twin.weight = self.weight.clone()
        twin.bias = None if self.bias is None else self.bias.clone()
        return twin


def interleaved_median_ms(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int,
                          device: torch.device) -> Dict[str, float]:
    """Median ms of each fn: called in turn round after round on the CPU (time_interleaved);
    on CUDA each timed on its own with events (median_ms)."""
    if device.type == "cuda":
        return {name: median_ms(fn, device, warmup, repeats) for name, fn in fns.items()}
    return time_interleaved(fns, runs=repeats, warmup=warmup)


def _format_of(pattern: str) -> Tuple[str, Optional[Tuple[int, int]]]:
    return {"unstructured": ("csr", None), "2:4": ("2:4", None), "block": ("bsr", DEFAULT_BLOCK)}[pattern]


def bench_sparse(sparsities: Sequence[float] = FULL_SPARSITIES, patterns: Sequence[str] = PATTERNS,
                 m_values: Sequence[int] = FULL_M, kn_values: Sequence[Tuple[int, int]] = FULL_KN,
                 device: str | torch.device = "cpu", threads: Optional[int] = None,
                 repeats: int = FULL_REPEATS, warmup: int = 1, seed: int = 0,
                 block: Tuple[int, int] = DEFAULT_BLOCK, allow_reference: bool = False,
                 progress: Optional[Callable[[str], None]] = None, cold: bool = False) -> dict:
    """Time the candidates (module docstring) over the grid; return {"machine", "settings",
    "rows", "notes"}. A row: K, N, pattern, sparsity (measured), M, <column>_ms for each column
    timed, and <kernel>_vs_<baseline> = baseline ms / kernel ms (above 1: the kernel is faster).
    2:4 is timed at 50% only (its sparsity is fixed). Without compiled kernels for ``device``
    the sparseq columns are left out unless ``allow_reference``. ``cold`` calls each column's
    module in turn from cold_copies() copies of it (bench.py's docstring), as a model's layers
    come, instead of reusing one."""
    device = torch.device(device)
    for pattern in patterns:
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    rows: List[dict] = []
    notes: List[str] = []
    compiled = ops.ext_supports(device)
    if not compiled:
        notes.append(f"no compiled sparseq kernels for {device}: " +
                     ("sparseq columns time the pure-PyTorch reference" if allow_reference
                      else "sparseq columns skipped (--allow-reference times the reference)"))
    sparseq_columns = compiled or allow_reference
    if device.type != "cpu":
        notes.append(f"{TORCH_INT8}: CPU only in torch, not timed on {device}")
    if "2:4" in patterns and any(s != 0.5 for s in sparsities):
        notes.append("2:4 is timed at 50% sparsity only")
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with _num_threads(threads), torch.no_grad():
        for k, n in kn_values:
            dense = nn.Linear(k, n)
            dense_modules = {FP32: copy.deepcopy(dense).to(device, dtype)}
            if sparseq_columns:
                dense_modules[INT8_DENSE] = Int8Linear.from_dense(dense).to(device)
            if device.type == "cpu":
                torch_int8, why_not = _torch_dynamic_int8(dense)
                if torch_int8 is not None:
                    dense_modules[TORCH_INT8] = torch_int8
                elif why_not not in notes:
                    notes.append(why_not)
            if cold:
                pattern_columns = 1 + (len(SPARSEQ_PATTERN_COLUMNS) if sparseq_columns else 0)
                check_cold_fits(len(dense_modules) + pattern_columns, device)
            copies = {name: cold_copies(module, device) if cold else 1 for name, module in dense_modules.items()}
            # Built once per shape: cold, they are tens of copies of the dense weights.
            dense_rotations = {name: weight_rotation(module, copies[name]) for name, module in dense_modules.items()}
            for pattern, sparsity in itertools.product(patterns, sparsities):
                # Cold, the last pattern's copies go before this one's are built.
                modules = rotations = fns = None
                if pattern == "2:4" and sparsity != 0.5:
                    continue
                pruned = copy.deepcopy(dense)
                pruned.weight.copy_(prune_to(dense.weight, pattern, sparsity, block, generator))
                measured = float((pruned.weight == 0).float().mean())
                fmt, fmt_block = _format_of(pattern)
                if pattern == "block":
                    fmt_block = tuple(block)
                modules = {TORCH_CSR: TorchCSRLinear(pruned.to(device, dtype))}
                if sparseq_columns:
                    modules[SPARSE] = SparseLinear.from_dense(pruned, format=fmt, block=fmt_block).to(device, dtype)
                    modules[SPARSE_INT8] = SparseInt8Linear.from_dense(pruned, format=fmt,
                                                                      block=fmt_block).to(device)
                    modules[SPARSE_W8A8] = SparseInt8Linear.from_dense(pruned, act_bits=8).to(device)
                rotations = dict(dense_rotations)
                copies.update({name: cold_copies(module, device) if cold else 1 for name, module in modules.items()})
                rotations.update({name: weight_rotation(module, copies[name]) for name, module in modules.items()})
                for m in m_values:
                    if progress is not None:
                        progress(f"K={k} N={n} {pattern} {measured:.0%} M={m}")
                    x = torch.randn(m, k, generator=generator).to(device)
                    fns = {name: (lambda turn=turn, name=name:
                                  next(turn)(x if name == TORCH_INT8 else x.to(dtype)))
                           for name, turn in rotations.items()}
                    ms = interleaved_median_ms(fns, warmup, repeats, device)
                    row = {"K": k, "N": n, "pattern": pattern, "block": list(fmt_block) if fmt_block else None,
                           "sparsity": round(measured, 4), "M": m,
                           "weight_copies": {name: copies[name] for name in rotations}}
                    if SPARSE_W8A8 in modules:  # "auto" picks it by pattern and CPU
                        row[f"{SPARSE_W8A8}_format"] = modules[SPARSE_W8A8].format
                    row.update({f"{name}_ms": ms[name] for name in COLUMNS if name in ms})
                    for kernel, base in RATIOS:
                        if kernel in ms and base in ms:
                            row[f"{kernel}_vs_{base}"] = ms[base] / ms[kernel]
                    rows.append(row)
        info = machine_info(device)
    settings = {"sparsities": list(sparsities), "patterns": list(patterns), "M": list(m_values),
                "KN": [list(kn) for kn in kn_values], "block": list(block), "repeats": repeats,
                "warmup": warmup, "statistic": "median, interleaved", "threads": info["threads"],
                "dtype": str(dtype).replace("torch.", ""),
                "weights": "cold (copies cycled, twice the last-level cache)" if cold else "hot (one weight reused)"}
    return {"machine": info, "settings": settings, "rows": rows, "notes": notes}


_HEADERS = {FP32: "fp32", TORCH_CSR: "t.csr", INT8_DENSE: "int8", TORCH_INT8: "t.int8", SPARSE: "sparse",
            SPARSE_INT8: "sp.int8", SPARSE_W8A8: "sp.w8a8"}


def format_table(rows: Sequence[dict]) -> str:
    """Fixed-width text: one line per (shape, pattern, sparsity, M) with each column's ms and the
    ratios ("sparse/fp32" = fp32 ms / sparse ms: above 1, sparse is faster)."""
    columns = [c for c in COLUMNS if any(f"{c}_ms" in r for r in rows)]
    ratios = [(kernel, base) for kernel, base in RATIOS if any(f"{kernel}_vs_{base}" in r for r in rows)]
    headers = (["K", "N", "pattern", "zeros", "M"] + [_HEADERS[c] + " ms" for c in columns]
               + [f"{_HEADERS[k]}/{_HEADERS[b]}" for k, b in ratios])
    body = []
    for r in rows:
        pattern = r["pattern"] + (f" {r['block'][0]}x{r['block'][1]}" if r["pattern"] == "block" else "")
        body.append([str(r["K"]), str(r["N"]), pattern, f"{r['sparsity']:.0%}", str(r["M"])]
                    + [f"{r[c + '_ms']:.3f}" if c + "_ms" in r else "n/a" for c in columns]
                    + [f"{r[f'{k}_vs_{b}']:.2f}x" if f"{k}_vs_{b}" in r else "n/a" for k, b in ratios])
    widths = [max(len(line[i]) for line in [headers] + body) for i in range(len(headers))]

    def fmt(line):
        return "  ".join(cell.ljust(w) if i == 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    out = [fmt(headers), fmt(["-" * w for w in widths])]
    previous = None
    for r, line in zip(rows, body):
        key = (r["K"], r["N"], r["pattern"], r["sparsity"])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(fmt(line))
    return "\n".join(out)


def plot_speedup(result: dict, path: str) -> None:
    """PNG: speedup of SparseLinear over dense fp32 against sparsity, one line per (pattern, M),
    one panel per weight shape. Needs matplotlib."""
    plt = pyplot()
    rows = [r for r in result["rows"] if f"{SPARSE}_vs_{FP32}" in r]
    if not rows:
        raise ValueError("no SparseLinear timings to plot (were the sparseq columns skipped?)")
    shapes = sorted({(r["K"], r["N"]) for r in rows}, key=lambda kn: -kn[0] * kn[1])
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, (k, n) in zip(axes[0], shapes):
        for pattern in PATTERNS:
            for m in sorted({r["M"] for r in rows}):
                points = sorted((r["sparsity"], r[f"{SPARSE}_vs_{FP32}"]) for r in rows
                                if (r["K"], r["N"], r["pattern"], r["M"]) == (k, n, pattern, m))
                if points:
                    style = {"unstructured": "-o", "2:4": "s", "block": "--^"}[pattern]
                    ax.plot(*zip(*points), style, label=f"{pattern} M={m}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"K={k}, N={n}")
        ax.set_xlabel("sparsity (fraction of zeros)")
        ax.set_ylabel("speedup over dense fp32 nn.Linear")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    machine = result["machine"]
    fig.suptitle(f"sparseq SparseLinear, {machine.get('cpu_model')}, {machine.get('threads')} threads",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
