"""quantize_: swap a model's nn.Linear layers for sparseq's int8 layers, in place."""
from __future__ import annotations

from typing import Iterable, Optional

import torch.nn as nn

from ..convert import FilterFn, swap_modules
from ..nn import Int8Linear, Int8WeightOnlyLinear

SCHEMES = {
    "w8a8": Int8Linear,  # int8 weights, activations quantized per row at run time
    "w8a16": Int8WeightOnlyLinear,  # int8 weights, float activations (bf16/fp16, or fp32)
}

# nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj, so that
# layer has to stay an nn.Linear (torch's own quantize_dynamic leaves it alone for this reason).
KEEP_AS_LINEAR = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


def quantize_(model: nn.Module, scheme: str = "w8a8", filter_fn: Optional[FilterFn] = None,
              skip: Iterable[str] = (), **layer_kwargs) -> nn.Module:
    """Replace every nn.Linear inside ``model`` with an int8 layer, in place; return ``model``.

    scheme: "w8a8" (Int8Linear) or "w8a16" (Int8WeightOnlyLinear).
    filter_fn(module, fully_qualified_name) -> bool: only the Linear layers it accepts are swapped.
    skip: fnmatch patterns on module names to leave alone, with everything under them.
    layer_kwargs go to the layer's from_dense (e.g. act_bits=7, backend="cpu").
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_ swaps submodules in place and cannot replace the model itself; "
                         f"use {SCHEMES[scheme].__name__}.from_dense(linear) for a single layer")
    layer_cls = SCHEMES[scheme]

    def make_replacement(module: nn.Module, fqn: str) -> Optional[nn.Module]:
        if not isinstance(module, nn.Linear) or isinstance(module, KEEP_AS_LINEAR):
            return None
        return layer_cls.from_dense(module, **layer_kwargs)

    swap_modules(model, make_replacement, filter_fn=filter_fn, skip=skip)
    return model
