"""Layer-by-layer calibration for passes that prune from activations (Wanda, SparseGPT).

Each layer is pruned on the activations of the model whose earlier layers are already pruned
(the sequential variant of both papers), so later layers see, and compensate for, the errors of
earlier ones. Layers run in the order the model first executes them. Layers that read the very
same input tensor one after the other (an attention block's q, k and v projections) form a group
and share one calibration pass; each pass stops the forward once its group has seen its input,
so a pass costs only the part of the model up to that group.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..calib import StopForward, all_or_nothing, input_hooks, run_batches
from .masks import Masks

logger = logging.getLogger("sparseq.prune")


def linear_like(layers: Dict[str, nn.Module], method: str) -> None:
    """Refuse layers whose weight is not a [out, in] matrix applied to the last input dimension
    (convolutions): the activation statistics of ``method`` are per input feature."""
    for name, layer in layers.items():
        if isinstance(layer, nn.modules.conv._ConvNd) or layer.weight.dim() != 2:
            raise ValueError(f"{method} prunes linear layers only; layer {name!r} is a "
                             f"{type(layer).__name__} (use magnitude for it, or leave it out "
                             f"with targets=/ignore=)")


def check_reiterable(calib_data: Iterable, what: str = "calib_data") -> None:
    """Layer-by-layer calibration reads the data once per group: refuse one-shot iterators."""
    if isinstance(calib_data, Iterator):
        raise TypeError(f"{what} is read once per group of layers and must be re-iterable (a list "
                        f"or a DataLoader), not a one-shot {type(calib_data).__name__}")


def execution_groups(model: nn.Module, layers: Dict[str, nn.Module], calib_data: Iterable,
                     what: str = "calib_data") -> Tuple[List[List[str]], Dict[str, int]]:
    """The names of ``layers`` in the order the model first runs them on the first batch,
    grouped: consecutive layers whose first input is the same tensor share a group; and how many
    times each layer runs in that forward. A layer the batch never reaches is a ValueError
    naming it."""
    calls: List[str] = []
    first_input: Dict[str, torch.Tensor] = {}
    call_counts: Dict[str, int] = {}

    def record(name, module, x):
        call_counts[name] = call_counts.get(name, 0) + 1
        if name not in first_input:
            first_input[name] = x
            calls.append(name)

    with input_hooks(layers, record):
        run_batches(model, calib_data, what, max_batches=1)
    unreached = [name for name in layers if name not in first_input]
    if unreached:
        raise ValueError(f"{what} never reaches layer(s) {unreached}: they cannot be calibrated "
                         f"(leave them out with ignore=)")
    groups: List[List[str]] = []
    for name in calls:
        if groups and first_input[name] is first_input[groups[-1][-1]]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups, call_counts


def calibrate_group(model: nn.Module, layers: Dict[str, nn.Module], group: List[str],
                    calib_data: Iterable, observe: Callable[[str, torch.Tensor], None],
                    call_counts: Dict[str, int], max_batches: Optional[int] = None,
                    what: str = "calib_data") -> None:
    """Run the calibration data through ``model`` calling ``observe(name, input)`` for every
    call of a layer in ``group``; each forward is cut short once the group's layers have run as
    often as ``call_counts`` says they run in a forward (the rest of the model cannot change
    what the group sees)."""
    expected = sum(call_counts[name] for name in group)
    seen = [0]

    def hook(name, module, x):
        observe(name, x)
        seen[0] += 1
        if seen[0] == expected:
            raise StopForward

    def reset(module, args):
        seen[0] = 0

    # A forward pre-hook on the model itself marks where each batch starts.
    handle = model.register_forward_pre_hook(reset)
    try:
        with input_hooks({name: layers[name] for name in group}, hook):
            run_batches(model, calib_data, what, max_batches=max_batches)
    finally:
        handle.remove()


def prune_sequentially(model: nn.Module, layers: Dict[str, nn.Module], calib_data: Iterable,
                       start: Callable[[str, nn.Module], Callable[[torch.Tensor], None]],
                       finish: Callable[[str, nn.Module], torch.Tensor],
                       max_batches: Optional[int] = None, method: str = "pruning",
                       sequential: bool = True) -> Masks:
    """Prune ``layers`` group by group in execution order; return their Masks. With
    ``sequential=False`` every layer is calibrated in one pass on the unpruned model instead
    (faster, usually less accurate).

    For each layer, ``start(name, layer)`` returns the function that accumulates its input
    statistics; once its group's calibration pass is done, ``finish(name, layer)`` prunes the
    layer in place from them and returns its keep-mask. If anything fails part way the model's
    parameters are restored.
    """
    linear_like(layers, method)
    check_reiterable(calib_data)
    with all_or_nothing(model):
        masks = Masks(model, _prune_groups(model, layers, calib_data, start, finish, max_batches,
                                           sequential))
    logger.info("%s: %d layers, %.2f%% of their weights zeroed", method, len(masks),
                100 * masks.sparsity())
    return masks


def _prune_groups(model, layers, calib_data, start, finish, max_batches,
                  sequential) -> Dict[str, torch.Tensor]:
    masks: Dict[str, torch.Tensor] = {}
    groups, call_counts = execution_groups(model, layers, calib_data)
    if not sequential:
        groups = [[name for group in groups for name in group]]
    for group in groups:
        observers = {name: start(name, layers[name]) for name in group}
        calibrate_group(model, layers, group, calib_data, lambda name, x: observers[name](x),
                        call_counts, max_batches)
        for name in group:
            masks[name] = finish(name, layers[name])
            del observers[name]  # free the statistics before the next group
    return {name: masks[name] for name in layers}
