"""Per-call overhead of sparseq's layers on small layers / batch 1, beside nn.Linear.

    python bench/bench_layer_overhead.py [--calls 2000] [--repeats 5] [--m 1]
        [--shapes 8x8:0.5 300x784:0.04 784x300:0.04]

For every shape (out x in : density of the kept weights) and every layer kind it times, on one
thread with time.thread_time (CPU time of this thread: insensitive to other processes on a shared
machine), the best of --repeats rounds of --calls calls of:
  layer    the sparseq layer's forward (what a model pays)
  door     the sparseq.ops function the layer calls, with the same tensors
  raw op   torch.ops.sparseq.<op>.default with the same tensors (the C++ kernel alone)
  linear   nn.Linear of the same shape (dense fp32), the baseline
and prints microseconds per call and layer/linear. The rounds alternate between the callables
so a change of machine load hits them alike; compare ratios of one run, not times across runs.
The "raw op" column is empty without the compiled extension.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

import sparseq
from sparseq import ops
from sparseq.nn import Int8Linear, Int8WeightOnlyLinear, SparseInt8Linear, SparseLinear

BSR_BLOCK = (4, 4)


def masked_linear(out_features: int, in_features: int, density: float, pattern: str,
                  seed: int = 0) -> nn.Linear:
    """nn.Linear whose weight keeps ~density of its entries (pattern "unstructured", "2:4" or
    "block": whole BSR_BLOCK blocks kept) and is exactly zero elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    w = linear.weight.detach()
    if pattern == "2:4":
        groups = w[:, : in_features // 4 * 4].reshape(out_features, -1, 4)
        keep = groups.abs().topk(2, dim=2).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
        full = torch.ones_like(w, dtype=torch.bool)
        full[:, : in_features // 4 * 4] = mask.reshape(out_features, -1)
        full[:, in_features // 4 * 4:] = False
    elif pattern == "block":
        bh, bw = BSR_BLOCK
        blocks = torch.rand(-(-out_features // bh), -(-in_features // bw), generator=gen) < density
        blocks.view(-1)[0] = True  # at least one block
        full = blocks.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:out_features, :in_features]
    else:
        full = torch.rand(w.shape, generator=gen) < density
        full.view(-1)[0] = True
    with torch.no_grad():
        linear.weight.mul_(full)
    return linear


def _sparse_calls(layer: SparseLinear, x: torch.Tensor):
    """(door, raw op) callables computing what ``layer`` computes on x."""
    kwargs = {"in_features": layer.in_features}
    if layer.format == "csr":
        args = (x, layer.seg_ptr, layer.col_offsets, layer.values, layer.w_scale, layer.bias)
        door, raw = ops.sparse_csr_linear, "sparse_csr_linear"
    elif layer.format == "2:4":
        args = (x, layer.values, layer.meta, layer.w_scale, layer.bias)
        door, raw = ops.sparse24_linear, "sparse24_linear"
    else:
        args = (x, layer.block_row_ptr, layer.block_col_idx, layer.values, layer.w_scale, layer.bias)
        door, raw = ops.bsr_linear, "bsr_linear"
        kwargs["out_features"] = layer.out_features
        kwargs["indices_validated"] = True
        return (lambda: door(*args, **kwargs)), _raw(raw, args + (layer.out_features,))
    return (lambda: door(*args, **kwargs)), _raw(raw, args)


def _int8_calls(layer, x: torch.Tensor):
    if isinstance(layer, Int8Linear):
        qmax = 63 if layer.act_bits_for(x.device) == 7 else 127
        args = (x, layer.w_packed, layer.w_scale, layer.w_rowsum, layer.bias, qmax)
        return (lambda: ops.int8_linear(*args, in_features=layer.in_features)), _raw("int8_linear", args)
    args = (x, layer.w_packed, layer.w_scale, layer.bias)
    return ((lambda: ops.int8_weight_only_linear(*args, in_features=layer.in_features)),
            _raw("int8_weight_only_linear", args))


def _raw(name: str, args):
    if not sparseq.HAS_EXT:
        return None
    op = getattr(torch.ops.sparseq, name).default
    return lambda: op(*args)


def layer_kinds(out_features: int, in_features: int, density: float):
    """(name, dense nn.Linear baseline, sparseq layer) for every layer kind at this shape."""
    unstructured = masked_linear(out_features, in_features, density, "unstructured")
    semi = masked_linear(out_features, in_features, density, "2:4")
    block = masked_linear(out_features, in_features, density, "block")
    return [
        ("SparseInt8Linear csr", unstructured, SparseInt8Linear.from_dense(unstructured, format="csr")),
        ("SparseLinear csr fp32", unstructured, SparseLinear.from_dense(unstructured, format="csr")),
        ("SparseInt8Linear 2:4", semi, SparseInt8Linear.from_dense(semi, format="2:4")),
        ("SparseLinear bsr fp32", block, SparseLinear.from_dense(block, format="bsr", block=BSR_BLOCK)),
        ("Int8Linear (W8A8)", unstructured, Int8Linear.from_dense(unstructured)),
        ("Int8WeightOnlyLinear", unstructured, Int8WeightOnlyLinear.from_dense(unstructured)),
    ]


def best_us(fns: dict, calls: int, repeats: int) -> dict:
    """Best microseconds per call of each callable, rounds alternating between them."""
    for fn in fns.values():
        for _ in range(max(50, calls // 10)):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.thread_time() - start) / calls * 1e6)
    return best


@torch.inference_mode()
def measure(shapes, m: int = 1, calls: int = 2000, repeats: int = 5) -> list[dict]:
    """One row per (shape, layer kind): microseconds of layer / door / raw op / nn.Linear."""
    rows = []
    for out_features, in_features, density in shapes:
        x = torch.randn(m, in_features)
        for name, linear, layer in layer_kinds(out_features, in_features, density):
            if isinstance(layer, SparseLinear):
                door, raw = _sparse_calls(layer, x)
            else:
                door, raw = _int8_calls(layer, x)
            torch.testing.assert_close(layer(x), linear(x), rtol=0.05, atol=0.05)
            fns = {"layer": lambda: layer(x), "door": door, "linear": lambda: linear(x)}
            if raw is not None:
                fns["raw"] = raw
            us = best_us(fns, calls, repeats)
            rows.append({"shape": f"{out_features}x{in_features}", "density": density, "m": m,
                         "kind": name, **us})
    return rows


def parse_shape(text: str) -> tuple[int, int, float]:
    dims, _, density = text.partition(":")
    out_features, in_features = (int(v) for v in dims.split("x"))
    return out_features, in_features, float(density or 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8x8:0.5", "300x784:0.04", "784x300:0.04"],
                        help="out x in : density of kept weights (2:4 layers keep 50%% whatever this says)")
    parser.add_argument("--m", type=int, default=1, help="batch rows")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure([parse_shape(s) for s in args.shapes], args.m, args.calls, args.repeats)
    print(f"torch {torch.__version__}, extension {'built' if sparseq.HAS_EXT else 'ABSENT'}, 1 thread, "
          f"M={args.m}, best of {args.repeats} x {args.calls} calls, time.thread_time, us per call")
    print(f"{'shape':>9} {'density':>7}  {'layer kind':<22} {'layer':>7} {'door':>7} {'raw op':>7} "
          f"{'nn.Linear':>9} {'layer/Linear':>12} {'layer-raw':>9}")
    for r in rows:
        raw = r.get("raw")
        raw_text = "" if raw is None else f"{raw:7.1f}"
        overhead = "" if raw is None else f"{r['layer'] - raw:9.1f}"
        print(f"{r['shape']:>9} {r['density']:>7.0%}  {r['kind']:<22} {r['layer']:7.1f} {r['door']:7.1f} "
              f"{raw_text:>7} {r['linear']:9.1f} {r['layer'] / r['linear']:11.2f}x {overhead:>9}")

if __name__ == "__main__":
    main()
