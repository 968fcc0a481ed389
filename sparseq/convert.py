"""The module-swap engine every model pass uses (quantize_, and later sparsify_ / prune).

A pass supplies one function, ``make_replacement(module, fqn) -> nn.Module | None``; this module
walks the model and puts each returned module where the original stood, in place, whatever the
container (attributes of custom modules, nn.Sequential, nn.ModuleList, nn.ModuleDict).
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, List, Optional

import torch.nn as nn

MakeReplacement = Callable[[nn.Module, str], Optional[nn.Module]]
FilterFn = Callable[[nn.Module, str], bool]


def name_matches(fqn: str, patterns: Iterable[str]) -> bool:
    """Whether the dotted module name ``fqn``, or the name of a module enclosing it, matches one
    of the fnmatch ``patterns`` (the rule every pass's skip / ignore argument follows)."""
    parts = fqn.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern)
               for i in range(1, len(parts) + 1) for pattern in patterns)


def _is_under(fqn: str, prefixes: Iterable[str]) -> bool:
    return any(fqn.startswith(prefix + ".") for prefix in prefixes)


def swap_modules(model: nn.Module, make_replacement: MakeReplacement,
                 filter_fn: Optional[FilterFn] = None, skip: Iterable[str] = ()) -> List[str]:
    """Replace submodules of ``model`` in place; return the fully qualified names replaced.

    For every submodule (by its dotted name, e.g. ``"blocks.0.mlp.fc1"``):
      - a name matching one of the fnmatch patterns in ``skip`` is left alone with everything
        under it (``skip=("head", "encoder.*")``);
      - if ``filter_fn(module, name)`` is given and returns False the module is not replaced
        (its children are still visited);
      - otherwise ``make_replacement(module, name)`` returns the new module, or None to keep it.
    The children of a replaced module are not visited. A module object reachable under several
    names (tied or shared) gets one replacement object, used at every name, so sharing survives.
    The root itself is never replaced: there is no parent to put a replacement in.
    """
    if isinstance(skip, str):  # a lone pattern would otherwise be read as a list of characters
        skip = (skip,)
    skip = tuple(skip)
    replacements: dict[int, Optional[nn.Module]] = {}
    handled: list[str] = []  # names whose subtree is done: skipped or replaced
    replaced: list[str] = []
    # List first: the walk must not see the modules it inserts.
    for fqn, module in list(model.named_modules(remove_duplicate=False)):
        if not fqn or _is_under(fqn, handled):
            continue
        if any(fnmatch.fnmatchcase(fqn, pattern) for pattern in skip):
            handled.append(fqn)
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        if id(module) not in replacements:
            replacements[id(module)] = make_replacement(module, fqn)
        new = replacements[id(module)]
        if new is None:
            continue
        parent_name, _, child_name = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, new)
        handled.append(fqn)
        replaced.append(fqn)
    return replaced
