"""The main job (`make demo`, `python -m sparseq.demo`): compress the real all-MiniLM-L6-v2 with
several recipes, save each with sparseq.save, load it back with sparseq.load (the deployed model:
what is timed and scored) and print one table: recipe, file size, CPU latency for 32 sentences x
128 tokens, speedup over fp32, mean cosine of the sentence embeddings to fp32.

Recipes (sparseq.compress; calibration and distillation text from sparseq.minilm):
  w8a8               the preset: dynamic W8A8 on every Linear (no data needed)
  w8a16              the preset: int8 weights, float activations
  2:4+w8a8           the preset: SparseGPT 2:4, int8 weights of the kept values (one-shot)
  ffn 1536->896 + distill + w8a8 + int4 embeddings
                     structured pruning of 5/12 of each FFN's neurons (by activation importance,
                     widths kept multiples of 64), a short distillation from the fp32 model
                     (output and every layer's hidden states), then W8A8 with the GELU fused into
                     the FFN's first int8 layer, and 4-bit embedding tables: the smallest and
                     fastest recipe (a third of the FFN: cosine 0.965 but 2.4x; half: 2.8x but
                     0.946 after as much distillation)
The targets (issue 5, this 2-core CPU, batch 32 x 128): w8a8 >= 1.8x with mean cosine >= 0.99;
the best sparse+int8 recipe >= 2.5x with cosine >= 0.95 and a file <= 20% of the fp32 one.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from . import minilm
from .bench import time_interleaved
from .compression import compress
from .serialization import load, save


# The best sparse+int8 recipe: the FFN of every layer cut from 1536 to 896 neurons.
BEST = "ffn 1536->896 + distill + w8a8 + int4 embeddings"


@dataclasses.dataclass(frozen=True)
class Settings:
    eval_texts: int
    calib_texts: int
    train_texts: int
    seq_len: int  # calibration / distillation / evaluation paragraphs are cut to this many tokens
    batch_size: int
    distill_steps: int
    latency_batch: int
    latency_seq: int
    latency_runs: int
    layers: Optional[int] = None  # only the first encoder layers (a smoke test); None: all 6
    judged: bool = True


FULL = Settings(eval_texts=256, calib_texts=128, train_texts=1024, seq_len=128, batch_size=16,
                distill_steps=384, latency_batch=32, latency_seq=128, latency_runs=11)
FAST = Settings(eval_texts=8, calib_texts=8, train_texts=8, seq_len=16, batch_size=4, distill_steps=2,
                latency_batch=2, latency_seq=16, latency_runs=1, layers=1, judged=False)


def hidden_state_features(layers: int) -> List[str]:
    """The modules whose outputs a distill step matches to the teacher's: every encoder layer's
    output LayerNorm but the last (the last hidden state is the output itself)."""
    return [f"encoder.layer.{i}.output.LayerNorm" for i in range(layers - 1)]


def recipes(settings: Settings, layers: int) -> Dict[str, List[Dict[str, Any]]]:
    """name -> what sparseq.compress runs (a preset name or a list of steps)."""
    return {
        "w8a8": "w8a8",
        "w8a16": "w8a16",
        "2:4+w8a8": "2:4+w8a8",
        BEST: [
            {"prune": {"method": "structured", "ratio": 5 / 12, "targets": ["ffn"], "importance": "activation",
                       "round_to": 64}},
            {"distill": {"steps": settings.distill_steps, "lr": 1e-4, "features": hidden_state_features(layers)}},
            {"quantize": {"scheme": "w8a8", "embeddings": 4}},
        ],
    }


# name -> (what it must reach, a check on the row); the targets of issue 5.
TARGETS: Dict[str, tuple] = {
    "w8a8": ("speedup >= 1.8, cosine >= 0.99", lambda r: r["speedup"] >= 1.8 and r["cosine"] >= 0.99),
    BEST: (
        "speedup >= 2.5, cosine >= 0.95, file <= 20%",
        lambda r: r["speedup"] >= 2.5 and r["cosine"] >= 0.95 and r["file_ratio"] <= 0.20),
}


def run(settings: Settings, out_dir: str, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Every recipe on a fresh copy of MiniLM; returns the report (rows, settings, machine)."""
    torch.manual_seed(0)
    dense, tokenizer = minilm.load_model(settings.layers)
    layers = len(dense.encoder.layer)
    train_texts, eval_texts = minilm.split_texts()
    calib = minilm.make_batches(tokenizer, train_texts[:settings.calib_texts], settings.seq_len, settings.batch_size)
    train = [(batch, None) for batch in minilm.make_batches(tokenizer, train_texts[:settings.train_texts],
                                                              settings.seq_len, settings.batch_size)]
    random.Random(2).shuffle(train)  # batches come sorted by length; mix them for training
    evaluation = minilm.make_batches(tokenizer, eval_texts[:settings.eval_texts], settings.seq_len, 32)
    reference = minilm.sentence_embeddings(dense, evaluation)
    timing_batch = dict(tokenizer(eval_texts[:settings.latency_batch], padding="max_length", truncation=True,
                                  max_length=settings.latency_seq, return_tensors="pt"))
    os.makedirs(out_dir, exist_ok=True)
    log(f"all-MiniLM-L6-v2 ({layers} layers), {torch.get_num_threads()} threads; {len(calib)} calibration and "
        f"{len(train)} distillation batches, {len(evaluation)} evaluation batches")

    deployed: Dict[str, nn.Module] = {}
    rows: List[Dict[str, Any]] = []

    def record(name: str, model: nn.Module, seconds: float) -> None:
        path = os.path.join(out_dir, name.replace("/", "_").replace(" ", "").replace("+", "_") + ".safetensors")
        save(model, path)
        loaded = load(path)  # what a user ships and runs: the file, rebuilt
        cosine = minilm.mean_cosine(reference, minilm.sentence_embeddings(loaded, evaluation))
        rows.append({"recipe": name, "file_bytes": os.path.getsize(path), "cosine": cosine,
                     "compress_seconds": round(seconds, 1), "path": path})
        deployed[name] = loaded
        log(f"  {name}: mean cosine {cosine:.4f}, file {os.path.getsize(path) / 1e6:.1f} MB ({seconds:.0f} s)")

    record("fp32", dense, 0.0)
    for name, recipe in recipes(settings, layers).items():
        start = time.perf_counter()
        trains = not isinstance(recipe, str) and any("distill" in step for step in recipe)
        model = compress(copy.deepcopy(dense), recipe, calib_data=calib, train_data=train if trains else None)
        record(name, model, time.perf_counter() - start)

    def forward(model: nn.Module) -> Callable[[], Any]:
        def call():
            with torch.no_grad():
                return model(**timing_batch)
        return call

    times = time_interleaved({name: forward(model) for name, model in deployed.items()},
                             runs=settings.latency_runs, warmup=2)
    for row in rows:
        row["latency_ms"] = times[row["recipe"]]
        row["speedup"] = times["fp32"] / row["latency_ms"]
        row["file_ratio"] = row["file_bytes"] / rows[0]["file_bytes"]
        target = TARGETS.get(row["recipe"])
        row["target"] = target[0] if target else ""
        row["passed"] = bool(target[1](row)) if target and settings.judged else None
    return {"settings": dataclasses.asdict(settings), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "rows": rows}


def format_table(report: Dict[str, Any]) -> str:
    settings = report["settings"]
    header = ("recipe", "file", "latency", "speedup", "mean cosine", "target", "")
    lines = [header]
    for row in report["rows"]:
        verdict = "" if row["passed"] is None else ("pass" if row["passed"] else "FAIL")
        lines.append((row["recipe"], f"{row['file_bytes'] / 1e6:.1f} MB ({row['file_ratio']:.0%})",
                      f"{row['latency_ms']:.0f} ms", f"{row['speedup']:.2f}x", f"{row['cosine']:.4f}",
                      row["target"], verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "-+-".join("-" * width for width in widths))
    text.append(f"latency: {settings['latency_batch']} sentences x {settings['latency_seq']} tokens, "
                f"{report['threads']} threads, median of {settings['latency_runs']} interleaved runs of the "
                "models loaded back from their files; file: sparseq.save (safetensors)")
    return "\n".join(text)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparseq.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="one encoder layer and a few texts (a smoke test)")
    parser.add_argument("--out", default=os.path.join("build", "demo"), help="folder for the saved models")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    args = parser.parse_args(argv)
    try:
        report = run(FAST if args.fast else FULL, args.out)
    except ImportError as exc:
        print(f"sparseq demo: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
