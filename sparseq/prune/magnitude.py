"""Magnitude pruning: zero the weights of smallest absolute value."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn

from .masks import Masks, Targets, layers_to_prune
from .patterns import Pattern, check_scope, global_masks_from_scores, mask_from_scores

logger = logging.getLogger("sparseq.prune")


def masks_by_scope(scores: Dict[str, torch.Tensor], sparsity: float, pattern: Pattern,
                   scope: str) -> Dict[str, torch.Tensor]:
    """Keep-masks from per-layer ``scores``: ranked across all layers together (scope="global")
    or within each layer (scope="layer")."""
    if scope == "global":
        return global_masks_from_scores(scores, sparsity, pattern)
    return {name: mask_from_scores(s, sparsity, pattern, name) for name, s in scores.items()}


def magnitude(model: nn.Module, sparsity: Optional[float] = None, scope: str = "global",
              pattern: Any = "unstructured", targets: Targets = (nn.Linear,),
              ignore: Iterable[str] = ()) -> Masks:
    """Zero the smallest-magnitude weights of ``model`` in place; return their Masks.

    sparsity: the fraction of weights to zero, in [0, 1); for an "n:m" pattern None (or 1 - n/m).
    scope: "global" ranks |W| over all target layers together (layers end with different
      sparsities, the total is exact); "layer" gives every layer the same sparsity. For N:M
      both are the same (each group of m is its own ranking).
    pattern: "unstructured", "2:4" / any "n:m" (along the input dimension), or a (bh, bw) block
      (whole blocks zeroed, ranked by mean |W|); see sparseq.prune.patterns.
    targets: the module classes pruned (nn.Linear by default; nn.Conv2d works too, its weight
      seen as [out, in*kh*kw]).
    ignore: fnmatch patterns of module names left dense (with everything under them).
    """
    scope = check_scope(scope)
    pattern, sparsity, layers = layers_to_prune(model, sparsity, pattern, targets, ignore)
    scores = {name: layer.weight.detach().abs() for name, layer in layers.items()}
    masks = Masks(model, masks_by_scope(scores, sparsity, pattern, scope)).apply()
    logger.info("magnitude pruning (%s, %s scope): %d layers, %.2f%% of their weights zeroed",
                pattern, scope, len(masks), 100 * masks.sparsity())
    return masks
