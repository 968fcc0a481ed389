"""quantize_: swap a model's nn.Linear layers for sparseq's int8 layers, in place."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch.nn as nn
import torch.nn.functional as F

from ..convert import FilterFn, swap_modules
from ..nn import Int8Linear, Int8StaticLinear, Int8WeightOnlyLinear, QuantizedEmbedding
from ..nn.int8_linear import FusedActivation, _W8A8Linear

SCHEMES = {
    "w8a8": Int8Linear,  # int8 weights, activations quantized per row at run time
    "w8a8_static": Int8StaticLinear,  # int8 weights, activations with one calibrated scale per layer
    "w8a16": Int8WeightOnlyLinear,  # int8 weights, float activations (bf16/fp16, or fp32)
}

# nn.MultiheadAttention reads out_proj.weight directly instead of calling out_proj, so that
# layer has to stay an nn.Linear (torch's own quantize_dynamic leaves it alone for this reason).
KEEP_AS_LINEAR = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


def check_scheme(scheme: str) -> type:
    """The layer class of a quantize_ scheme; ValueError for an unknown one."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def quantizable_layers(model: nn.Module, filter_fn: Optional[FilterFn] = None,
                       skip: Iterable[str] = ()) -> Dict[str, nn.Module]:
    """The Linear layers quantize_ would replace, by name (a shared layer under its first name),
    with quantize_'s filter_fn and skip rules."""
    found: Dict[str, nn.Module] = {}

    def record(module: nn.Module, fqn: str) -> None:
        if isinstance(module, nn.Linear) and not isinstance(module, KEEP_AS_LINEAR):
            if all(module is not seen for seen in found.values()):
                found[fqn] = module
        return None

    swap_modules(model, record, filter_fn=filter_fn, skip=skip)
    return found


def quantize_(model: nn.Module, scheme: str = "w8a8", filter_fn: Optional[FilterFn] = None,
              skip: Iterable[str] = (), skip_sensitive: int = 0, min_sqnr_db: Optional[float] = None,
              calib_data: Optional[Iterable[Any]] = None, **layer_kwargs) -> nn.Module:
    """Replace every nn.Linear inside ``model`` with an int8 layer, in place; return ``model``.

    scheme: "w8a8" (Int8Linear, dynamic activations), "w8a8_static" (Int8StaticLinear: the
    activation scale of each layer comes from its ``act_observer``, left by
    sparseq.quant.calibrate or QAT; a Linear without one raises ValueError), or "w8a16"
    (Int8WeightOnlyLinear).
    filter_fn(module, fully_qualified_name) -> bool: only the Linear layers it accepts are swapped.
    skip: fnmatch patterns on module names to leave alone, with everything under them.
    skip_sensitive: also leave in float the k layers whose quantization alone hurts the model's
    output most (lowest SQNR in sparseq.quant.sensitivity on ``calib_data``).
    min_sqnr_db: also leave in float every layer whose quantization alone brings the output's
    SQNR below this many dB (on ``calib_data``).
    layer_kwargs go to the layer's from_dense (e.g. act_bits=7, pow2_scales=True, backend="cpu").

    Every replacement is built before the first swap, so an error leaves the model untouched.
    """
    layer_cls = check_scheme(scheme)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_ swaps submodules in place and cannot replace the model itself; "
                         f"use {layer_cls.__name__}.from_dense(linear) for a single layer")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    if skip_sensitive or min_sqnr_db is not None:
        from .sensitivity import sensitivity

        if calib_data is None:
            raise ValueError("skip_sensitive / min_sqnr_db need calib_data to measure each layer's sensitivity")
        if not isinstance(skip_sensitive, int) or skip_sensitive < 0:
            raise ValueError(f"skip_sensitive must be a non-negative int, got {skip_sensitive!r}")
        report = sensitivity(model, calib_data, scheme, filter_fn=filter_fn, skip=skip, full=False,
                             **layer_kwargs)
        skip += tuple(report.sensitive(k=skip_sensitive, min_sqnr_db=min_sqnr_db))

    layers = quantizable_layers(model, filter_fn, skip)
    replacements = {}
    for name, module in layers.items():
        try:
            replacements[id(module)] = layer_cls.from_dense(module, **layer_kwargs)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"quantize_({scheme!r}): layer {name!r}: {exc}") from exc
    swap_modules(model, lambda module, fqn: replacements.get(id(module)), filter_fn=filter_fn, skip=skip)
    return model


def quantize_embeddings_(model: nn.Module, bits: int = 8, group_size: Optional[int] = None,
                         filter_fn: Optional[FilterFn] = None, skip: Iterable[str] = ()) -> nn.Module:
    """Replace every nn.Embedding inside ``model`` with a QuantizedEmbedding (``bits`` 8 or 4,
    ``group_size`` values per scale; defaults: a whole row for 8 bits, 32 for 4), in place;
    return ``model``. Lookups read only their rows, so this costs no speed: it shrinks the model
    (a transformer's token table is often its largest tensor). filter_fn and skip choose layers
    as in quantize_. Every replacement is built before the first swap, so an error leaves the
    model untouched. A table shared with an output Linear (tied weights) is quantized for the
    lookups only; the Linear keeps the float table (or quantize_ quantizes it on its own).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_embeddings_ expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Embedding):
        raise ValueError("quantize_embeddings_ swaps submodules in place and cannot replace the model itself; "
                         "use QuantizedEmbedding.from_dense(embedding) for a single table")
    replacements: Dict[int, nn.Module] = {}

    def build(module: nn.Module, fqn: str) -> None:
        if type(module) is nn.Embedding and id(module) not in replacements:
            try:
                replacements[id(module)] = QuantizedEmbedding.from_dense(module, bits=bits, group_size=group_size)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"quantize_embeddings_: embedding {fqn!r}: {exc}") from exc
        return None

    swap_modules(model, build, filter_fn=filter_fn, skip=skip)
    swap_modules(model, lambda module, fqn: replacements.get(id(module)), filter_fn=filter_fn, skip=skip)
    return model


# (linear, activation) attribute pairs of blocks that apply activation(linear(x)) in forward:
# transformers' BERT family (BertIntermediate, RobertaIntermediate, ...).
_LINEAR_THEN_ACTIVATION = (("dense", "intermediate_act_fn"),)


def is_exact_gelu(module: nn.Module) -> bool:
    """nn.GELU() or transformers' GELUActivation, both the erf form (not tanh-approximated)."""
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu


def fuse_gelu_(model: nn.Module) -> List[str]:
    """Fold every exact GELU that directly follows a W8A8 layer (Int8Linear, Int8StaticLinear)
    into that layer's kernel epilogue (activation="gelu"), replacing the GELU module with
    sparseq.nn.FusedActivation (an identity), in place; return the names of the fused layers.
    One pass over the output instead of two (MiniLM's FFN, 4096 x 384 -> 1536 on 2 cores: the
    GELU costs 1.0 ms inside the kernel, 2.4 ms on its own). Found: consecutive children of an
    nn.Sequential, and the (dense, intermediate_act_fn) pair of transformers' BERT-family
    blocks. Anything else is left as it is."""
    fused: List[str] = []
    uses: Dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1
    for name, parent in model.named_modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent._modules.items())
            pairs = [(children[i][0], children[i + 1][0]) for i in range(len(children) - 1)]
        else:
            pairs = [pair for pair in _LINEAR_THEN_ACTIVATION if all(a in parent._modules for a in pair)]
        for linear_name, act_name in pairs:
            linear, act = parent._modules[linear_name], parent._modules[act_name]
            # A layer used at several places may be followed by a GELU at one of them only.
            if (isinstance(linear, _W8A8Linear) and linear.activation == "none" and is_exact_gelu(act)
                    and uses[id(linear)] == 1):
                linear._set_activation("gelu")
                parent._modules[act_name] = FusedActivation("gelu")
                fused.append(f"{name}.{linear_name}" if name else linear_name)
    return fused
