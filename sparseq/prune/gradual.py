"""Gradual pruning during training (Zhu & Gupta 2017, "To prune, or not to prune"): the sparsity
rises along a cubic from an initial to a final value, fast at first while the network has
redundant weights to lose, slowly at the end."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn

from ..calib import input_hooks, run_batches, token_rows
from .magnitude import masks_by_scope
from .masks import Masks, Targets, layers_to_prune
from .patterns import (check_scope, check_sparsity, global_masks_from_scores, mask_from_scores,
                       parse_pattern)
from .sequential import linear_like
from .wanda import wanda_scores

logger = logging.getLogger("sparseq.prune")

METHODS = ("magnitude", "wanda")


def _check_step(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


class GradualPruner:
    """Prune ``model`` step by step during training on the cubic schedule of Zhu & Gupta:

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3

    with t0 = start_step, n * dt = end_step - start_step, dt = every, s_i = initial_sparsity,
    s_f = final_sparsity. Call ``.step()`` once per optimizer step (after it); at steps t0,
    t0 + dt, ... and at end_step the masks are recomputed for s_t and the weights zeroed; in
    between (and after end_step) the masks are held: attach them to the optimizer
    (``pruner.attach(optimizer)`` or ``pruner.masks.attach(optimizer)``) so training cannot
    regrow pruned weights. Weights once pruned stay pruned (the sparsity only rises).

    model: any nn.Module, pruned in place.
    final_sparsity: s_f in [0, 1); None (or 1 - n/m) for an "n:m" pattern.
    start_step, end_step, every: the schedule in optimizer steps (``.step()`` calls, counted
      from 0).
    method: "magnitude" (|W|) or "wanda" (|W| * ||X_j||, from ``calib_data`` run through the
      model, all layers in one pass, at every update).
    pattern: "unstructured", "n:m" or (bh, bw). An N:M pattern cannot hold an intermediate
      sparsity, so the schedule ramps inside it: at s_t the lowest-scoring s_t of the weights are
      zeroed among those the N:M mask of the current scores would zero; at end_step that is
      exactly the N:M mask, with the same smooth ramp as unstructured pruning.
    initial_sparsity: s_i, the sparsity at start_step (<= s_f).
    scope: "layer" (every layer at s_t, as in the paper) or "global" (|W| ranked over all
      layers; magnitude only).
    targets / ignore: which layers, as for magnitude.
    """

    def __init__(self, model: nn.Module, final_sparsity: Optional[float], start_step: int,
                 end_step: int, every: int = 1, method: str = "magnitude",
                 pattern: Any = "unstructured", initial_sparsity: float = 0.0,
                 scope: str = "layer", targets: Targets = (nn.Linear,), ignore: Iterable[str] = (),
                 calib_data: Optional[Iterable] = None):
        self.pattern, self.final_sparsity, self.layers = layers_to_prune(
            model, final_sparsity, pattern, targets, ignore)
        self.start_step = _check_step(start_step, "start_step", 0)
        self.end_step = _check_step(end_step, "end_step", start_step)
        self.every = _check_step(every, "every", 1)
        self.initial_sparsity = check_sparsity(initial_sparsity, parse_pattern("unstructured"))
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity {initial_sparsity} is above final_sparsity "
                             f"{self.final_sparsity:g}: gradual pruning only raises the sparsity")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.scope = check_scope(scope)
        if method == "wanda":
            if calib_data is None:
                raise ValueError('method="wanda" needs calib_data (batches to measure ||X_j|| on)')
            if scope != "layer":
                raise ValueError('method="wanda" ranks within layers: use scope="layer"')
            linear_like(self.layers, "GradualPruner(method='wanda')")
        self.method = method
        self.calib_data = calib_data
        self.model = model
        self.current_step = 0
        self._masks = Masks(model, {name: torch.ones_like(layer.weight, dtype=torch.bool)
                                    for name, layer in self.layers.items()})

    @property
    def masks(self) -> Masks:
        """The Masks now in force (all weights kept before the first update); the same object
        throughout, so an optimizer it is attached to always uses the latest masks."""
        return self._masks

    def attach(self, optimizer: torch.optim.Optimizer) -> "GradualPruner":
        """Hold the masks after every step of ``optimizer`` (see Masks.attach); return self."""
        self._masks.attach(optimizer)
        return self

    def sparsity_at(self, step: int) -> float:
        """The schedule's sparsity at ``step``: s_i up to start_step, the cubic in between,
        s_f from end_step on (so a schedule with start_step == end_step prunes to s_f at once)."""
        if step >= self.end_step:
            return self.final_sparsity
        if step <= self.start_step:
            return self.initial_sparsity
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        """Whether the masks are recomputed at ``step``: start_step, every ``every`` steps after
        it, and end_step."""
        return (self.start_step <= step <= self.end_step
                and ((step - self.start_step) % self.every == 0 or step == self.end_step))

    def step(self) -> Optional[float]:
        """Advance one optimizer step; at an update step prune to the schedule's sparsity and
        return it, else return None."""
        step = self.current_step
        self.current_step += 1
        if not self.is_update_step(step):
            return None
        sparsity = self.sparsity_at(step)
        self._masks.update(self._new_masks(sparsity)).apply()
        logger.info("gradual pruning, step %d: sparsity %.4f (masks %.2f%% zeros)", step, sparsity,
                    100 * self._masks.sparsity())
        return sparsity

    def _scores(self) -> Dict[str, torch.Tensor]:
        scores = {name: layer.weight.detach().abs().float() for name, layer in self.layers.items()}
        if self.method == "wanda":
            squared = {name: 0.0 for name in self.layers}

            def observe(name, module, x):
                squared[name] = squared[name] + token_rows(x.detach()).float().pow(2).sum(0)
            with input_hooks(self.layers, observe):
                run_batches(self.model, self.calib_data)
            unreached = [name for name, value in squared.items() if isinstance(value, float)]
            if unreached:
                raise ValueError(f"calib_data never reaches layer(s) {unreached}: no Wanda scores "
                                 f"for them (leave them out with ignore=)")
            scores = {name: wanda_scores(self.layers[name].weight, torch.as_tensor(squared[name]).sqrt())
                      for name in self.layers}
        # Already-pruned weights rank below every live one: the pruned set only grows.
        return {name: s.masked_fill(~self._masks[name].to(s.device), -1.0) for name, s in scores.items()}

    def _new_masks(self, sparsity: float) -> Dict[str, torch.Tensor]:
        scores = self._scores()
        per_row = self.method == "wanda"
        if self.pattern.kind == "n:m":
            # Weights the N:M mask keeps are out of the running: only its candidates are pruned.
            scores = {name: s.masked_fill(mask_from_scores(s, None, self.pattern, name), torch.inf)
                      for name, s in scores.items()}
            if self.scope == "global":
                return global_masks_from_scores(scores, sparsity, "unstructured")
            return {name: mask_from_scores(s, sparsity, "unstructured", name, per_row=per_row)
                    for name, s in scores.items()}
        if per_row and self.pattern.kind == "unstructured":
            return {name: mask_from_scores(s, sparsity, self.pattern, name, per_row=True)
                    for name, s in scores.items()}
        return masks_by_scope(scores, sparsity, self.pattern, self.scope)
