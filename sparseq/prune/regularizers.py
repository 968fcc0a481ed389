"""Sparsity-inducing terms for a training loss (the lambda * R(T) of min L(T, D) + lambda * R(T))
and the soft-thresholding step that goes with L1."""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
import torch.nn as nn

from .masks import Masks, Targets, prunable_layers
from .patterns import as_matrix, parse_pattern

logger = logging.getLogger("sparseq.prune")

GROUPS = ("row", "column", "channel")


def soft_threshold(model: nn.Module, alpha: float, targets: Targets = (nn.Linear,),
                   ignore: Iterable[str] = ()) -> Masks:
    """Shrink every target weight toward zero by ``alpha`` in place,
    W <- sign(W) * max(|W| - alpha, 0) (the proximal step of an L1 penalty): weights with
    |W| <= alpha become exactly zero. Returns the Masks of the zeros (held by attaching them to
    an optimizer, like any pruning pass).

    alpha: the threshold, a number >= 0. targets / ignore: which layers, as for magnitude.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    layers = prunable_layers(model, targets, ignore)
    with torch.no_grad():
        for layer in layers.values():
            weight = layer.weight
            weight.copy_(weight.sign() * (weight.abs() - alpha).clamp_min(0))
    masks = Masks(model, {name: layer.weight.detach() != 0 for name, layer in layers.items()})
    logger.info("soft threshold %g: %d layers, %.2f%% of their weights zero", alpha, len(masks),
                100 * masks.sparsity())
    return masks


def _total(terms: list) -> torch.Tensor:
    device = terms[0].device
    return torch.stack([term.to(device) for term in terms]).sum()


def l1_penalty(model: nn.Module, targets: Targets = (nn.Linear,), ignore: Iterable[str] = ()) -> torch.Tensor:
    """sum |W| over the weights (not biases) of the target layers: a differentiable scalar to
    add to a loss as lambda * l1_penalty(model), pushing single weights to zero.
    targets / ignore: which layers, as for magnitude."""
    layers = prunable_layers(model, targets, ignore)
    return _total([layer.weight.abs().sum() for layer in layers.values()])


def _group_norms(weight: torch.Tensor, groups: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The L2 norm of every group of ``weight`` and the number of weights in it."""
    matrix = as_matrix(weight)
    rows, cols = matrix.shape
    if groups == "row":
        return torch.linalg.vector_norm(matrix, dim=1), torch.full((rows,), float(cols))
    if groups == "column":
        return torch.linalg.vector_norm(matrix, dim=0), torch.full((cols,), float(rows))
    if groups == "channel":
        by_channel = weight.transpose(0, 1).reshape(weight.shape[1], -1)
        return (torch.linalg.vector_norm(by_channel, dim=1),
                torch.full((weight.shape[1],), float(by_channel.shape[1])))
    bh, bw = parse_pattern(groups).block
    padded = torch.nn.functional.pad(matrix, (0, -cols % bw, 0, -rows % bh))
    grid = (padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
    norms = torch.linalg.vector_norm(padded.reshape(grid), dim=(1, 3))
    present = torch.nn.functional.pad(torch.ones(rows, cols), (0, -cols % bw, 0, -rows % bh))
    return norms, present.reshape(grid).sum(dim=(1, 3))


def group_lasso_penalty(model: nn.Module, groups: Any = "row", targets: Targets = (nn.Linear,),
                        ignore: Iterable[str] = ()) -> torch.Tensor:
    """The group lasso sum_g sqrt(|g|) * ||W_g||_2 over the weights of the target layers, a
    differentiable scalar to add to a loss as lambda * group_lasso_penalty(model, ...): it
    drives whole groups to zero together. Each group's norm is weighted by the square root of
    its size |g| (Yuan & Lin 2006), so large and small groups are penalised alike per weight.

    groups (on the weight seen as [out, in], a conv weight as [out, in*kh*kw]):
      "row": each output neuron / conv filter (prunes output units);
      "column": each input feature (for a conv, one (in channel, kh, kw) position);
      "channel": each input channel, W[:, c] (for a conv all its kh*kw taps in every filter;
        for a Linear the same as "column"), so the layer feeding it can drop that channel;
      (bh, bw): blocks, as the BSR kernels store them (edge blocks weighted by their real size).
    targets / ignore: which layers, as for magnitude.
    """
    if not (isinstance(groups, (tuple, list)) or groups in GROUPS):
        raise ValueError(f"groups must be one of {GROUPS} or a (bh, bw) block, got {groups!r}")
    layers = prunable_layers(model, targets, ignore)
    terms = []
    for layer in layers.values():
        norms, sizes = _group_norms(layer.weight, groups)
        terms.append((sizes.to(norms.device, norms.dtype).sqrt() * norms).sum())
    return _total(terms)
