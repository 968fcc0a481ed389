"""Measurement behind `sparseq compress`'s before/after table and `sparseq bench model`: a dense
model beside compressed copies of it, on the same input batches.

size: the saved sparseq file beside the bytes of the dense model's tensors in float32 (parameters
  and persistent buffers, a tied tensor once).
parameters: the weights and biases each model computes with (a sparseq layer counts its logical
  [out, in] weight, not its packed buffers), and how many of them are nonzero.
latency: median of ``runs`` calls on one batch, every model called in turn each round
  (bench.time_interleaved) so drift in the machine's load hits them alike; speedup = dense ms /
  compressed ms.
quality: each model's main output (sparseq.calib.main_output: the logits, a transformers
  encoder's last hidden state, ...) against the dense model's on every batch: the mean cosine of
  matching output vectors (along the last dimension; padded tokens left out where a batch has an
  attention_mask) and the SQNR in dB over the same elements.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bench import machine_info, pyplot, time_interleaved
from .calib import batch_to, batch_token_mask, call_model, eval_mode, main_output, model_device
from .models import InputError
from .nn._frozen import FrozenLinearBase
from .quant.metrics import sqnr_db
from .serialization import _human_bytes as human_bytes

DEFAULT_RUNS = 5


def model_outputs(model: nn.Module, batches: Sequence[Any], what: str = "--calib",
                  progress: bool = False) -> List[torch.Tensor]:
    """The main output of ``model`` on every batch (float32, CPU), in eval mode without gradients.
    A batch the model cannot take raises InputError naming ``what`` and the batch."""
    from tqdm.auto import tqdm

    device = model_device(model)
    outputs = []
    with eval_mode(model), torch.no_grad():
        for index, batch in enumerate(tqdm(batches, desc="outputs", unit="batch", disable=not progress)):
            try:
                output = main_output(call_model(model, batch_to(batch, device)))
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                message = " ".join(str(exc).split())
                raise InputError(f"{what} data does not fit the model: batch {index} fails "
                                 f"({type(exc).__name__}: {message})") from exc
            outputs.append(output.detach().float().cpu())
    return outputs


def _output_rows(output: torch.Tensor, batch: Any) -> torch.Tensor:
    """The output vectors [n, features] that the quality compares, padded tokens left out."""
    mask = batch_token_mask(batch)
    if mask is not None and output.dim() == 3 and tuple(output.shape[:2]) == tuple(mask.shape):
        return output[mask.cpu()]
    if output.dim() < 2:
        return output.reshape(1, -1)
    return output.reshape(-1, output.shape[-1])


def agreement(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
              batches: Sequence[Any]) -> Dict[str, float]:
    """{"mean_cosine", "sqnr_db"} of ``outputs`` against ``reference`` (module docstring)."""
    ref = torch.cat([_output_rows(r, b) for r, b in zip(reference, batches)]).double()
    out = torch.cat([_output_rows(o, b) for o, b in zip(outputs, batches)]).double()
    return {"mean_cosine": float(F.cosine_similarity(ref, out, dim=-1).mean()), "sqnr_db": sqnr_db(ref, out)}


def parameter_counts(model: nn.Module) -> Tuple[int, int]:
    """(weights and biases the model computes with, how many of them are nonzero)."""
    # The model's own tensors, a tied one once (their ids stay valid: the model holds them).
    tensors = {id(t): t for module in model.modules() if not isinstance(module, FrozenLinearBase)
               for t in module._parameters.values() if t is not None}
    tensors.update({id(module.bias): module.bias for module in model.modules()
                    if isinstance(module, FrozenLinearBase) and module.bias is not None})
    total = sum(t.numel() for t in tensors.values())
    nonzero = sum(int(torch.count_nonzero(t.detach())) for t in tensors.values())
    for module in model.modules():
        if isinstance(module, FrozenLinearBase):  # unpacked one layer at a time
            weight = module.dense_weight()
            total += weight.numel()
            nonzero += int(torch.count_nonzero(weight))
    return total, nonzero


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers, floating ones as float32, a tied
    tensor once."""
    seen = set()
    count = 0
    for tensor in model.state_dict(keep_vars=True).values():
        if not isinstance(tensor, torch.Tensor) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        count += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
    return count


def latency_ms(models: Dict[str, nn.Module], batch: Any, runs: int = DEFAULT_RUNS,
               warmup: int = 1) -> Dict[str, float]:
    """Median ms of each model on ``batch``, the models called in turn every round."""
    with contextlib.ExitStack() as stack, torch.no_grad():
        fns: Dict[str, Callable[[], Any]] = {}
        for name, model in models.items():
            stack.enter_context(eval_mode(model))
            fns[name] = functools.partial(call_model, model, batch_to(batch, model_device(model)))
        return time_interleaved(fns, runs=runs, warmup=warmup)


def saved_bytes(model: nn.Module) -> int:
    """Size of the file sparseq.save writes for ``model``."""
    from .serialization import save

    with tempfile.TemporaryDirectory(prefix="sparseq-bench-") as folder:
        path = os.path.join(folder, "model.safetensors")
        save(model, path)
        return os.path.getsize(path)


# --------------------------------------------------------------------------------------------
# sparseq compress: before / after


def before_after(dense: nn.Module, compressed: nn.Module, file_bytes: int,
                 batches: Optional[Sequence[Any]], reference: Optional[Sequence[torch.Tensor]],
                 runs: int = DEFAULT_RUNS, progress: bool = False) -> dict:
    """The numbers of `sparseq compress`'s table: {"dense": {...}, "compressed": {...}}, each
    with parameters, nonzero_parameters, bytes (fp32 tensors / the saved file) and, when
    ``batches`` are given, latency_ms; "compressed" also speedup, size_ratio and the quality
    (mean_cosine, sqnr_db) against ``reference`` (the dense model's outputs on ``batches``)."""
    sides = {}
    for name, model, size in (("dense", dense, fp32_bytes(dense)), ("compressed", compressed, file_bytes)):
        total, nonzero = parameter_counts(model)
        sides[name] = {"parameters": total, "nonzero_parameters": nonzero, "bytes": size}
    sides["dense"]["bytes_of"] = "fp32 tensors"
    sides["compressed"]["bytes_of"] = "saved file"
    sides["compressed"]["size_ratio"] = file_bytes / max(sides["dense"]["bytes"], 1)
    if batches:
        ms = latency_ms({"dense": dense, "compressed": compressed}, batches[0], runs)
        for name in sides:
            sides[name]["latency_ms"] = ms[name]
        sides["compressed"]["speedup"] = ms["dense"] / ms["compressed"]
        outputs = model_outputs(compressed, batches, progress=progress)
        sides["compressed"].update(agreement(reference, outputs, batches))
    return sides


def _format_db(value: float) -> str:
    return "identical" if math.isinf(value) else f"{value:.1f}"


def _table(headers: Sequence[str], body: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> str:
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]

    def fmt(line):
        return "  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(line, widths))).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(line) for line in body])


def format_before_after(sides: dict) -> str:
    """before_after's numbers as a text table: dense, compressed and the ratio between them."""
    dense, compressed = sides["dense"], sides["compressed"]
    body = [
        ["parameters", f"{dense['parameters']:,}", f"{compressed['parameters']:,}",
         f"{compressed['parameters'] / max(dense['parameters'], 1):.2f}x"],
        ["nonzero parameters", f"{dense['nonzero_parameters']:,}", f"{compressed['nonzero_parameters']:,}",
         f"{compressed['nonzero_parameters'] / max(dense['nonzero_parameters'], 1):.2f}x"],
        [f"bytes ({dense['bytes_of']} / {compressed['bytes_of']})", human_bytes(dense["bytes"]),
         human_bytes(compressed["bytes"]), f"{compressed['size_ratio']:.2f}x"],
    ]
    if "latency_ms" in compressed:
        body += [
            ["latency (ms, median)", f"{dense['latency_ms']:.3f}", f"{compressed['latency_ms']:.3f}",
             f"speedup {compressed['speedup']:.2f}x"],
            ["mean cosine to dense", "1", f"{compressed['mean_cosine']:.4f}", ""],
            ["SQNR to dense (dB)", "", _format_db(compressed["sqnr_db"]), ""],
        ]
    return _table(["", "dense fp32", "compressed", "compressed / dense"], body)


# --------------------------------------------------------------------------------------------
# sparseq bench model


def bench_model(dense: nn.Module, recipes: Sequence[Any], calib: Sequence[Any], train: Optional[Sequence[Any]] = None,
                runs: int = DEFAULT_RUNS, progress: bool = False,
                labels: Optional[Sequence[str]] = None) -> dict:
    """Compress a copy of ``dense`` with each recipe (sparseq.compress on ``calib`` / ``train``),
    then time the dense model and every copy on the first calibration batch, interleaved.
    Returns {"machine", "settings", "rows", "notes"}; a row: recipe (None for the dense model),
    ms, speedup (dense ms / ms), bytes (fp32 tensors for the dense model, the saved file for the
    others), mean_cosine, sqnr_db. A recipe that cannot run on this model is left out with a note."""
    from . import compress

    labels = list(labels) if labels is not None else [str(recipe) for recipe in recipes]
    reference = model_outputs(dense, calib, progress=progress)
    models: Dict[str, nn.Module] = {}
    rows: Dict[str, dict] = {"dense fp32": {"recipe": None, "bytes": fp32_bytes(dense),
                                            "mean_cosine": 1.0, "sqnr_db": math.inf}}
    notes: List[str] = []
    for recipe, label in zip(recipes, labels):
        model = copy.deepcopy(dense)
        try:
            compress(model, recipe, calib_data=calib, train_data=train, progress=progress)
        except (ValueError, TypeError, RuntimeError) as exc:
            notes.append(f"{label}: not run ({' '.join(str(exc).split())})")
            continue
        models[label] = model
        rows[label] = {"recipe": label, "bytes": saved_bytes(model),
                       **agreement(reference, model_outputs(model, calib, progress=progress), calib)}
    ms = latency_ms({"dense fp32": dense, **models}, calib[0], runs)
    for name, row in rows.items():
        row["ms"] = ms[name]
        row["speedup"] = ms["dense fp32"] / ms[name]
    settings = {"runs": runs, "statistic": "median, interleaved", "latency_batch": describe_batch(calib[0]),
                "calib_batches": len(calib), "threads": torch.get_num_threads()}
    return {"machine": machine_info(), "settings": settings, "rows": list(rows.values()), "notes": notes}


def describe_batch(batch: Any) -> str:
    """A batch's tensor shapes, e.g. "input_ids 8x128, attention_mask 8x128" or "8x64"."""
    def shape(tensor: Any) -> str:
        return "x".join(map(str, tensor.shape)) if isinstance(tensor, torch.Tensor) else type(tensor).__name__

    if isinstance(batch, dict):
        return ", ".join(f"{key} {shape(value)}" for key, value in batch.items())
    if isinstance(batch, (tuple, list)):
        return ", ".join(shape(value) for value in batch)
    return shape(batch)


def format_bench_table(rows: Sequence[dict]) -> str:
    body = [[row["recipe"] or "dense fp32", f"{row['ms']:.3f}", f"{row['speedup']:.2f}x", human_bytes(row["bytes"]),
             f"{row['mean_cosine']:.4f}", _format_db(row["sqnr_db"])] for row in rows]
    return _table(["model", "ms", "speedup", "size", "mean cosine", "SQNR dB"], body)


def plot_latency(result: dict, path: str) -> None:
    """PNG: a bar of latency per model (dense and each recipe), its speedup written above it."""
    plt = pyplot()
    rows = result["rows"]
    names = [row["recipe"] or "dense fp32" for row in rows]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2.5, 4.2))
    bars = ax.bar(names, [row["ms"] for row in rows], color=["grey"] + ["tab:blue"] * (len(rows) - 1))
    for bar, row in zip(bars, rows):
        ax.annotate(f"{row['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("latency (ms, median)")
    machine, settings = result["machine"], result["settings"]
    ax.set_title(f"{settings['latency_batch']}; {machine.get('cpu_model')}, {settings['threads']} threads",
                 fontsize=8)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
