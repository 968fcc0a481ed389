"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): prune each layer so its output on calibration data changes least, updating
the surviving weights to compensate (the Optimal Brain Surgeon update, column by column)."""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from ..calib import token_rows
from .masks import Masks, Targets, layers_to_prune
from .patterns import Pattern, block_mask, count_pruned, prune_lowest
from .sequential import prune_sequentially

logger = logging.getLogger("sparseq.prune")


class HessianAccumulator:
    """H = 2 X^T X / n over every input row seen (inputs [..., in] flattened to rows), kept as
    a running mean in float32 so it stays O(1) in size however many rows arrive."""

    def __init__(self, columns: int, device: torch.device):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        rows = token_rows(x.detach()).float()
        if rows.shape[0] == 0:
            return
        total = self.rows + rows.shape[0]
        self.hessian.mul_(self.rows / total)
        rows = rows * (2.0 / total) ** 0.5
        self.hessian.addmm_(rows.t(), rows)
        self.rows = total


def _upper_cholesky_of_inverse(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping * I)^-1, damping = percdamp * mean(diag H);
    the damping grows tenfold (up to three times) if H is too ill-conditioned to factor."""
    damp = percdamp * float(torch.diagonal(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        damp = max(damp, 1e-8) * 10
        logger.info("sparsegpt: Hessian not positive definite, damping raised to %g", damp)
    raise ValueError("sparsegpt: the input Hessian cannot be factored even with strong damping "
                     "(are the calibration inputs finite?)")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern,
                    blocksize: int = 128, percdamp: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor]:
    """One layer of SparseGPT: ``weight`` [out, in] pruned given the input Hessian
    ``hessian`` [in, in] = 2 X^T X / n; returns (the pruned, updated weight in float32, the
    keep-mask).

    Columns are processed left to right in blocks of ``blocksize``: each pruned weight's error
    is spread over the not-yet-processed columns of its row through the inverse Hessian (its
    upper Cholesky factor), within the block at once and onto later blocks lazily. The mask is
    chosen adaptively on the already-updated weights by the OBS saliency w^2 / [H^-1]_jj^2:
    unstructured, per block of columns (the cumulative count is exact, so the whole layer gets
    exactly count_pruned(sparsity, numel) zeros); "n:m", per group of m columns (m - n per row);
    (bh, bw), whole blocks inside each column block (the column block a multiple of bw).
    Inputs never active on the calibration data (H_jj = 0) are pruned first: removing them
    changes nothing the data can see.
    """
    weight = weight.detach().float().clone()
    rows, columns = weight.shape
    hessian = hessian.float().clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    hinv = _upper_cholesky_of_inverse(hessian, percdamp)
    if pattern.kind == "n:m":
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    elif pattern.kind == "block":
        blocksize = max(pattern.block[1], blocksize // pattern.block[1] * pattern.block[1])
    keep = torch.ones_like(weight, dtype=torch.bool)

    def saliency(block_weight, block_hinv_diag, dead_columns):
        scores = block_weight.pow(2) / block_hinv_diag.reshape(1, -1).pow(2)
        return scores.masked_fill(dead_columns.reshape(1, -1), -1.0)

    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block = weight[:, start:end].clone()
        block_hinv = hinv[start:end, start:end]
        block_diag = torch.diagonal(block_hinv)
        errors = torch.zeros_like(block)
        block_keep = keep[:, start:end]
        if pattern.kind == "unstructured":
            pruned = count_pruned(sparsity, rows * end) - count_pruned(sparsity, rows * start)
            scores = saliency(block, block_diag, dead[start:end])
            block_keep.copy_(prune_lowest(scores.reshape(1, -1), pruned).reshape(block.shape))
        elif pattern.kind == "block":
            pruned = count_pruned(sparsity, rows * end) - count_pruned(sparsity, rows * start)
            scores = saliency(block, block_diag, dead[start:end])
            block_keep.copy_(block_mask(scores, pattern.block, pruned))
        for i in range(end - start):
            if pattern.kind == "n:m" and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                scores = saliency(block[:, group], block_diag[group], dead[start:end][group])
                block_keep[:, group] = prune_lowest(scores, pattern.m - pattern.n)
            column = block[:, i]
            quantized = column * block_keep[:, i]
            error = (column - quantized) / block_diag[i]
            block[:, i:] -= error.unsqueeze(1) * block_hinv[i, i:].unsqueeze(0)
            block[:, i] = quantized
            errors[:, i] = error
        weight[:, start:end] = block
        weight[:, end:] -= errors @ hinv[start:end, end:]
    return weight, keep


def sparsegpt(model: nn.Module, calib_data: Iterable, sparsity: Optional[float] = None,
              pattern: Any = "unstructured", targets: Targets = (nn.Linear,),
              ignore: Iterable[str] = (), max_batches: Optional[int] = None,
              sequential: bool = True, blocksize: int = 128, percdamp: float = 0.01) -> Masks:
    """Prune ``model`` in place with SparseGPT; return the Masks.

    Every target layer gets the input Hessian H = 2 X^T X / n of its calibration inputs and is
    pruned by sparsegpt_prune: the weights whose removal costs least are zeroed and the
    survivors of each row are updated so the layer's output on the calibration data changes as
    little as possible. Layers are pruned one group at a time in execution order, each on the
    activations of the model whose earlier layers are already pruned (and updated), as in the
    paper; see sparseq.prune.sequential.

    calib_data: a re-iterable of batches (a list or a DataLoader) run by the batch convention.
    sparsity: fraction zeroed in [0, 1), exact per layer; None (or 1 - n/m) for "n:m".
    pattern: "unstructured", "n:m" or (bh, bw) blocks.
    targets / ignore: which layers, as for magnitude; only linear layers.
    max_batches: use at most this many calibration batches per layer group.
    sequential: False calibrates every layer in one pass on the unpruned model (one pass
      instead of one per group: faster, usually less accurate).
    blocksize: columns updated together (the lazy-batch size of the paper; also the span of an
      unstructured mask choice). percdamp: damping, a fraction of the mean diagonal of H.
    The model is restored if anything fails part way.
    """
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not percdamp > 0:
        raise ValueError(f"percdamp must be positive, got {percdamp!r}")
    pattern, sparsity, layers = layers_to_prune(model, sparsity, pattern, targets, ignore)
    accumulators = {}

    def start(name, layer):
        accumulators[name] = HessianAccumulator(layer.weight.shape[1], layer.weight.device)
        return accumulators[name].add

    def finish(name, layer):
        hessian = accumulators.pop(name).hessian
        pruned, keep = sparsegpt_prune(layer.weight, hessian, sparsity, pattern, blocksize, percdamp)
        with torch.no_grad():
            layer.weight.copy_(pruned.to(layer.weight.dtype))
        return keep

    return prune_sequentially(model, layers, calib_data, start, finish, max_batches,
                              method=f"sparsegpt ({pattern})", sequential=sequential)
