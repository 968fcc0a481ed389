"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
prune by |W_ij| * ||X_j||_2, the weight's magnitude times the norm of the input feature it reads."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from ..calib import token_rows
from .masks import Masks, Targets, layers_to_prune
from .patterns import mask_from_scores
from .sequential import prune_sequentially


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W| scaled per input column by the L2 norm of that input feature over the calibration
    rows: the Wanda importance of every weight."""
    return weight.detach().abs().float() * input_norms.to(weight.device).reshape(1, -1)


def wanda(model: nn.Module, calib_data: Iterable, sparsity: Optional[float] = None,
          pattern: Any = "unstructured", targets: Targets = (nn.Linear,), ignore: Iterable[str] = (),
          max_batches: Optional[int] = None, sequential: bool = True) -> Masks:
    """Prune ``model`` in place with Wanda; return the Masks.

    Each weight is scored |W_ij| * ||X_j||_2, X_j being input feature j of the layer over every
    calibration row (inputs [..., in] are flattened to rows). Unstructured: the lowest-scoring
    ``sparsity`` of every output row is zeroed (the paper's per-output comparison group, so each
    row holds round(sparsity * in) zeros); "n:m": the lowest m - n of each group of m inputs;
    (bh, bw) blocks: the blocks of lowest mean score in each layer. Layers are pruned one group
    at a time in execution order, each on the activations of the model whose earlier layers are
    already pruned (the paper's sequential variant); see sparseq.prune.sequential.

    calib_data: a re-iterable of batches (a list or a DataLoader) run by the batch convention
      (dict -> model(**b), tuple/list -> model(*b), tensor -> model(b)).
    sparsity: fraction zeroed in [0, 1); None (or 1 - n/m) for an "n:m" pattern.
    targets / ignore: which layers, as for magnitude; only linear layers (convolutions are
      refused by name).
    max_batches: use at most this many calibration batches per layer group.
    sequential: False calibrates every layer in one pass on the unpruned model (one pass
      instead of one per group: faster, usually less accurate).
    The model is restored if anything fails part way (e.g. a batch the model rejects).
    """
    pattern, sparsity, layers = layers_to_prune(model, sparsity, pattern, targets, ignore)
    squared_norms = {}

    def start(name, layer):
        squared_norms[name] = torch.zeros(layer.weight.shape[1], dtype=torch.float32,
                                          device=layer.weight.device)

        def observe(x):
            squared_norms[name] += token_rows(x.detach()).float().pow(2).sum(0)
        return observe

    def finish(name, layer):
        scores = wanda_scores(layer.weight, squared_norms.pop(name).sqrt())
        keep = mask_from_scores(scores, sparsity, pattern, name,
                                per_row=pattern.kind == "unstructured")
        with torch.no_grad():
            layer.weight.masked_fill_(~keep, 0)
        return keep

    return prune_sequentially(model, layers, calib_data, start, finish, max_batches,
                              method=f"wanda ({pattern})", sequential=sequential)
