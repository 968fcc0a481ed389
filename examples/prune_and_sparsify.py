"""Prune an MLP with torch.nn.utils.prune, then make the zeros fast with sparseq.sparsify_.

torch's pruning only masks weights: the pruned model runs exactly as fast as the dense one.
sparseq.sparsify_ folds the masks and swaps each pruned nn.Linear for a sparse layer.

    python examples/prune_and_sparsify.py [--amount 0.9] [--batch 16] [--int8]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

import sparseq
import sparseq.bench


def median_ms(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return sparseq.bench.median_ms(lambda: model(x), x.device, warmup=3, repeats=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--amount", type=float, default=0.9, help="fraction of each weight pruned")
    parser.add_argument("--int8", action="store_true", help="also store the surviving weights as int8")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.width, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden),
                          nn.ReLU(), nn.Linear(args.hidden, args.width)).eval()
    for layer in model:
        if isinstance(layer, nn.Linear):
            prune.l1_unstructured(layer, "weight", amount=args.amount)  # masks only
    x = torch.randn(args.batch, args.width)

    with torch.no_grad():
        reference = model(x)
    pruned_ms = median_ms(model, x)

    sparseq.sparsify_(model, int8=args.int8)  # in place (a torch-pruned model cannot be deep-copied)
    print(model)
    with torch.no_grad():
        out = model(x)
    print(f"max abs difference to the torch-pruned model: {(reference - out).abs().max():.2e}")
    sparse_ms = median_ms(model, x)
    kernels = "compiled kernels" if sparseq.HAS_EXT else "pure-PyTorch reference (extension not built)"
    print(f"torch-pruned: {pruned_ms:.2f} ms   sparseq: {sparse_ms:.2f} ms   speedup {pruned_ms / sparse_ms:.2f}x "
          f"[{kernels}, {torch.get_num_threads()} threads, batch {args.batch}]")


if __name__ == "__main__":
    main()
