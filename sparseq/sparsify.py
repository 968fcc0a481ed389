"""sparsify_: swap every nn.Linear whose weight holds zeros for a sparse layer, in place."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from .convert import FilterFn, swap_modules
from .nn import Int8Linear, Int8WeightOnlyLinear, SparseInt8Linear, SparseLinear
from .nn.sparse_linear import choose_format
from .quant.quantize import KEEP_AS_LINEAR


def pruned_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight ``linear`` computes with: weight_orig * weight_mask for a module pruned with
    torch.nn.utils.prune (whose reparametrisation is still attached), else its weight."""
    if hasattr(linear, "weight_orig") and hasattr(linear, "weight_mask"):
        return (linear.weight_orig * linear.weight_mask).detach()
    return linear.weight.detach()


def _plain_copy(linear: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear with ``weight`` folded in and no pruning hooks (the original is untouched)."""
    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if linear.bias is not None:
            plain.bias.copy_(linear.bias.detach())
    return plain


def sparsify_(model: nn.Module, filter_fn: Optional[FilterFn] = None, int8: bool = False,
              format: str = "auto", skip: Iterable[str] = (), backend: Optional[str] = None,
              act_bits: Optional[int] = None) -> nn.Module:
    """Replace every nn.Linear of ``model`` whose weight has zeros with a sparse layer, in place;
    return ``model``.

    A layer pruned with torch.nn.utils.prune (weight_orig / weight_mask) has its mask folded
    first, so the zeros the mask makes are the ones the sparse kernels skip.
    int8=False: SparseLinear.from_dense(format=format); "auto" keeps a layer dense (as an
      nn.Linear, untouched) where its zeros are too few for a sparse kernel to be faster.
    int8=True: SparseInt8Linear (int8 codes of the nonzeros); with format="auto", a layer too
      dense for sparsity to pay becomes Int8WeightOnlyLinear (the same float-activation,
      per-channel int8 numerics, dense).
    int8=True, act_bits=8 or 7: activations quantized per row too (W8A8, like torch's
      quantize_dynamic): SparseInt8Linear(act_bits) in its W8A8 format (sliced ELL, or 2:4; see
      SparseInt8Linear), and a layer too dense for sparsity to pay becomes Int8Linear(act_bits).
    filter_fn(module, name) -> bool and skip (fnmatch patterns) choose layers as in quantize_.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify_ expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("sparsify_ swaps submodules in place and cannot replace the model itself; "
                         "use sparseq.nn.SparseLinear.from_dense(linear) for a single layer")
    if act_bits not in (None, 7, 8):
        raise ValueError(f"act_bits must be None (float activations), 8 or 7, got {act_bits!r}")
    if act_bits is not None and not int8:
        raise ValueError("act_bits (int8 activations) goes with int8=True")

    def make_replacement(module: nn.Module, fqn: str) -> Optional[nn.Module]:
        if not isinstance(module, nn.Linear) or isinstance(module, KEEP_AS_LINEAR):
            return None
        weight = pruned_weight(module)
        if not bool((weight == 0).any()):
            return None
        linear = _plain_copy(module, weight)
        # Chosen once here (the layers' own "auto" would scan the weight's pattern again).
        choice = choose_format(weight) if format == "auto" else None
        if choice is not None and choice.format == "dense":
            if act_bits is not None:
                return Int8Linear.from_dense(linear, act_bits=act_bits, backend=backend)
            if int8:
                return Int8WeightOnlyLinear.from_dense(linear, backend=backend)
            # A pruned module still gets its mask folded (and its hooks dropped).
            return linear if hasattr(module, "weight_orig") else None
        if act_bits is not None:  # the layer's own "auto" picks its W8A8 format
            return SparseInt8Linear.from_dense(linear, format=format, act_bits=act_bits, backend=backend)
        layer_cls = SparseInt8Linear if int8 else SparseLinear
        if choice is None:
            return layer_cls.from_dense(linear, format=format, backend=backend)
        layer = layer_cls.from_dense(linear, format=choice.format, block=choice.block, backend=backend)
        layer.format_reason = choice.reason
        return layer

    swap_modules(model, make_replacement, filter_fn=filter_fn, skip=skip)
    return model
