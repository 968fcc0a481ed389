"""calibrate: static activation ranges for the Linear layers of a model, from real data."""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn

from ..calib import Batch, input_hooks, run_batches, token_rows
from ..convert import name_matches
from .observers import Observer, ObserverSpec, make_observer

logger = logging.getLogger("sparseq")


def named_targets(model: nn.Module, targets: Sequence[Type[nn.Module]] = (nn.Linear,),
                  skip: Iterable[str] = ()) -> Dict[str, nn.Module]:
    """The submodules of ``model`` that are instances of ``targets``, by name, minus those whose
    name (or an ancestor's) matches an fnmatch pattern of ``skip``; a module reachable under
    several names is listed once, under its first."""
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in targets):
        raise TypeError(f"targets must be a non-empty tuple of nn.Module classes, got {targets!r}")
    found: Dict[str, nn.Module] = {}
    seen = set()
    for name, module in model.named_modules():
        if not name or id(module) in seen or not isinstance(module, targets):
            continue
        if name_matches(name, skip):
            continue
        seen.add(id(module))
        found[name] = module
    return found


def calibrate(model: nn.Module, calib_data: Iterable[Batch], observer: ObserverSpec = "minmax",
              targets: Tuple[Type[nn.Module], ...] = (nn.Linear,), skip: Iterable[str] = (),
              max_batches: Optional[int] = None) -> nn.Module:
    """Observe the input activations of every target layer on ``calib_data`` and leave on each
    one an attribute ``act_observer`` whose ``scale(qmax)`` is its static per-tensor activation
    scale (what ``quantize_(model, "w8a8_static")`` reads). Returns ``model``.

    calib_data: an iterable of batches (dict -> model(**b), tuple/list -> model(*b), tensor ->
    model(b)), run in eval mode without gradients.
    observer: "minmax", "percentile" (99.99th percentile of |x|), "mse" (the clipping range of
    least quantization error), or a factory returning an object with observe(x) and scale(qmax).
    targets: the module classes to calibrate (nn.Linear and its subclasses by default).
    skip: fnmatch patterns of module names left alone, with everything under them.
    max_batches: use at most this many batches.

    Layers the data never reaches get no observer (a warning names them). Nothing is attached
    unless every batch ran: a batch the model rejects or NaN/Inf activations raise ValueError
    and leave the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate expects an nn.Module, got {type(model).__name__}")
    layers = named_targets(model, targets, skip)
    if not layers:
        raise ValueError(f"calibrate found no {[t.__name__ for t in targets]} layers to calibrate in the "
                         f"{type(model).__name__} (after skip={tuple(skip)})")
    trained = [name for name, module in layers.items() if isinstance(getattr(module, "act_observer", None), nn.Module)]
    if trained:
        raise ValueError(f"layer(s) {trained} already carry a trained activation range (QAT): quantize_ reads it "
                         f"as it is; leave them out of calibrate (skip=...)")
    observers: Dict[str, Observer] = {name: make_observer(observer) for name in layers}

    def observe(name: str, module: nn.Module, x: torch.Tensor) -> None:
        try:
            observers[name].observe(token_rows(x))
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from exc

    with input_hooks(layers, observe):
        run_batches(model, calib_data, max_batches=max_batches)

    unreached = [name for name, obs in observers.items() if getattr(obs, "count", 1) == 0]
    if unreached:
        logger.warning("sparseq.quant.calibrate: no calibration data reached %s; they get no act_observer",
                       ", ".join(unreached))
    for name, module in layers.items():
        if name not in unreached:
            module.act_observer = observers[name]
    return model
