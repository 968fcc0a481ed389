"""Quantize a small MLP to int8 with sparseq, check its outputs, and time it.

    python examples/quantize_mlp.py [--hidden 2048] [--batch 16] [--scheme w8a8|w8a16]
"""
import argparse
import copy

import torch
import torch.nn as nn

import sparseq
import sparseq.bench
from sparseq.quant import quantize_, sqnr_db


def mlp(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, width))


def median_ms(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return sparseq.bench.median_ms(lambda: model(x), x.device, warmup=3, repeats=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--scheme", choices=("w8a8", "w8a16"), default="w8a8")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = mlp(args.width, args.hidden).eval()
    x = torch.randn(args.batch, args.width)

    quantized = quantize_(copy.deepcopy(model), args.scheme)  # in place; deepcopy keeps the original
    print(quantized)

    with torch.no_grad():
        reference, out = model(x), quantized(x)
    print(f"output SQNR vs fp32: {sqnr_db(reference, out):.1f} dB (max abs error {(reference - out).abs().max():.2e})")

    fp32_ms, int8_ms = median_ms(model, x), median_ms(quantized, x)
    kernels = "compiled kernels" if sparseq.HAS_EXT else "pure-PyTorch reference (extension not built)"
    print(f"fp32: {fp32_ms:.2f} ms   {args.scheme}: {int8_ms:.2f} ms   speedup {fp32_ms / int8_ms:.2f}x "
          f"[{kernels}, {torch.get_num_threads()} threads, batch {args.batch}]")

    # The packed weights are ordinary buffers: save them, load them into a fresh quantized skeleton.
    fresh = quantize_(mlp(args.width, args.hidden), args.scheme)
    fresh.load_state_dict(quantized.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    print("state_dict round trip: identical outputs")


if __name__ == "__main__":
    main()
