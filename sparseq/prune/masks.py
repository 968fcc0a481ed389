"""Which layers a pass prunes, and the Masks object every pruning pass returns."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Mapping, Sequence, Tuple, Type

import torch
import torch.nn as nn

from ..convert import name_matches
from .patterns import Pattern, check_fits, check_sparsity, parse_pattern

Targets = Sequence[Type[nn.Module]]


def _normalise_ignore(ignore: Iterable[str] | str | None) -> Tuple[str, ...]:
    if ignore is None:
        return ()
    if isinstance(ignore, str):  # a lone pattern, not a list of characters
        return (ignore,)
    ignore = tuple(ignore)
    for pattern in ignore:
        if not isinstance(pattern, str):
            raise TypeError(f"ignore must hold fnmatch name patterns (str), got {type(pattern).__name__}")
    return ignore


def prunable_layers(model: nn.Module, targets: Targets = (nn.Linear,),
                    ignore: Iterable[str] | str | None = ()) -> Dict[str, nn.Module]:
    """The layers of ``model`` a pass prunes, by dotted name, in module order: instances of one
    of ``targets`` with a weight of at least 2 dimensions, except those whose name (or an
    enclosing module's name) matches an fnmatch pattern in ``ignore``. A module shared under
    several names appears once. No such layer is a ValueError."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(targets, type):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in targets):
        raise TypeError(f"targets must be nn.Module classes such as (nn.Linear,), got {targets!r}")
    ignore = _normalise_ignore(ignore)
    layers: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and name_matches(name, ignore):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(module, targets) and isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            layers[name] = module
    if not layers:
        raise ValueError(f"no prunable layers in {type(model).__name__}: nothing matches targets="
                         f"{tuple(t.__name__ for t in targets)} outside ignore={list(ignore)}")
    return layers


def layers_to_prune(model: nn.Module, sparsity: Any, pattern: Any, targets: Targets,
                    ignore: Iterable[str] | str | None) -> Tuple[Pattern, float, Dict[str, nn.Module]]:
    """The checked (pattern, sparsity, layers) of a pruning pass: every argument validated and
    every layer checked against the pattern before anything is modified."""
    pattern = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, pattern)
    layers = prunable_layers(model, targets, ignore)
    for name, layer in layers.items():
        check_fits(pattern, layer.weight.shape, name)
    return pattern, sparsity, layers


class Masks(Mapping[str, torch.Tensor]):
    """The pruning masks of a model: layer name -> boolean tensor shaped like that layer's
    weight, True where the weight is kept and False where it is held at zero.

    ``apply()`` zeroes the masked weights again; ``attach(optimizer)`` does so after every
    ``optimizer.step()`` (fine-tuning keeps the zeros) until ``detach()``; ``report()`` is a
    table of what was pruned; ``sparsity()`` the fraction of masked weights that are zeroed.
    Masks follow the model if it moves to another device (each mask moves the first time it is
    applied there).
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        self._model = model
        self._masks: Dict[str, torch.Tensor] = {}
        self._handles: list = []
        self.update(masks)

    # Mapping interface
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def _weight(self, name: str) -> torch.Tensor:
        return self._model.get_submodule(name).weight

    def update(self, masks: Mapping[str, torch.Tensor]) -> "Masks":
        """Replace the masks of the named layers (others are kept); an optimizer this object is
        attached to uses the new masks from its next step. Does not zero anything: see apply()."""
        for name, mask in masks.items():
            weight = self._weight(name)
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight "
                                 f"{tuple(weight.shape)}")
            self._masks[name] = mask.detach().to(torch.bool)
        return self

    @torch.no_grad()
    def apply(self) -> "Masks":
        """Zero every masked weight in place (on the parameter's own device); return self."""
        for name, mask in self._masks.items():
            weight = self._weight(name)
            if mask.device != weight.device:
                mask = self._masks[name] = mask.to(weight.device)
            weight.data.masked_fill_(~mask, 0)
        return self

    def attach(self, optimizer: torch.optim.Optimizer) -> "Masks":
        """Zero the masked weights now and again after every ``optimizer.step()`` (a step
        post-hook), until detach(); return self. Several optimizers may be attached."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.apply()
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        return self

    def detach(self) -> "Masks":
        """Stop re-applying the masks after optimizer steps; return self."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def zeros(self) -> Dict[str, int]:
        """Number of zeroed (masked-out) weights per layer."""
        return {name: int((~mask).sum()) for name, mask in self._masks.items()}

    def sparsity(self) -> float:
        """The fraction of all masked layers' weights that the masks zero."""
        total = sum(mask.numel() for mask in self._masks.values())
        return sum(self.zeros().values()) / total if total else 0.0

    def report(self) -> str:
        """A printable table: per layer its weight shape, parameter count, zeros and sparsity,
        then a total row."""
        header = ("layer", "shape", "params", "zeros", "sparsity")
        rows = []
        zeros = self.zeros()
        for name, mask in self._masks.items():
            rows.append((name, "x".join(map(str, mask.shape)), str(mask.numel()), str(zeros[name]),
                         f"{zeros[name] / mask.numel():.2%}"))
        total = sum(mask.numel() for mask in self._masks.values())
        rows.append(("total", "", str(total), str(sum(zeros.values())), f"{self.sparsity():.2%}"))
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

        def line(row):
            return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths)))
        rule = "-" * len(line(header))
        return "\n".join([line(header), rule] + [line(r) for r in rows[:-1]] + [rule, line(rows[-1])])

    def __repr__(self) -> str:
        return f"Masks({len(self)} layers, {self.sparsity():.2%} zeros, attached={self.attached})"
