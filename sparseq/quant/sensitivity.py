"""How much each layer's quantization costs the model's output, and what power-of-two scales cost.

sensitivity(model, calib_data, scheme) quantizes one Linear at a time (swapping it in and back
out), measures the SQNR of the model's output against the float model's on the calibration
batches, and reports the layers from most to least sensitive. quantize_(..., skip_sensitive=k)
or (..., min_sqnr_db=x) uses it to keep the layers that hurt most in float.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..calib import iter_batches, main_output, run_batches
from ..convert import FilterFn
from .metrics import sqnr_db
from .quantize import check_scheme, quantizable_layers, quantize_


def model_outputs(model: nn.Module, batches: List[Any]) -> List[torch.Tensor]:
    """The main output tensor (sparseq.calib.main_output) of ``model`` on every batch, in float32
    on the CPU, run in eval mode without gradients."""
    outputs: List[torch.Tensor] = []

    def keep(module, args, output):
        outputs.append(main_output(output).detach().float().cpu())

    handle = model.register_forward_hook(keep)
    try:
        run_batches(model, batches)
    finally:
        handle.remove()
    return outputs


def outputs_sqnr_db(reference: List[torch.Tensor], approx: List[torch.Tensor]) -> float:
    """SQNR in dB of every output element over all batches together."""
    return sqnr_db(torch.cat([r.flatten() for r in reference]), torch.cat([a.flatten() for a in approx]))


@dataclass
class SensitivityReport:
    """Per-layer SQNR (dB) of the model's output with only that layer quantized, most sensitive
    (lowest SQNR) first; full_sqnr_db is the SQNR with every layer quantized (None if not measured)."""

    scheme: str
    layers: List[Tuple[str, float]] = field(default_factory=list)
    full_sqnr_db: Optional[float] = None

    def sensitive(self, k: int = 0, min_sqnr_db: Optional[float] = None) -> List[str]:
        """The names of the k most sensitive layers, plus every layer below min_sqnr_db dB."""
        names = [name for name, _ in self.layers[:k]]
        if min_sqnr_db is not None:
            names += [name for name, db in self.layers if db < min_sqnr_db and name not in names]
        return names

    def as_dict(self) -> Dict[str, float]:
        return dict(self.layers)

    def table(self) -> str:
        """The report as a text table."""
        width = max([len("(all layers)")] + [len(name) for name, _ in self.layers])
        lines = [f"sensitivity to {self.scheme} (output SQNR with only that layer quantized)",
                 f"{'layer':<{width}}  {'SQNR dB':>8}"]
        lines += [f"{name:<{width}}  {db:8.2f}" for name, db in self.layers]
        if self.full_sqnr_db is not None:
            lines.append(f"{'(all layers)':<{width}}  {self.full_sqnr_db:8.2f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _names_of(model: nn.Module, target: nn.Module) -> List[str]:
    return [name for name, module in model.named_modules(remove_duplicate=False) if module is target and name]


def _put(model: nn.Module, names: List[str], module: nn.Module) -> None:
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def sensitivity(model: nn.Module, calib_data: Iterable[Any], scheme: str = "w8a8",
                filter_fn: Optional[FilterFn] = None, skip: Iterable[str] = (),
                max_batches: Optional[int] = None, full: bool = True, **layer_kwargs) -> SensitivityReport:
    """Per-layer sensitivity of ``model`` to ``scheme`` (a quantize_ scheme): for each Linear that
    quantize_ would swap (filter_fn and skip as there), the SQNR in dB of the model's output
    (sparseq.calib.main_output, over all of ``calib_data``'s batches) when only that layer is
    quantized, against the float model's. Returns a SensitivityReport, most sensitive layer
    first; with full=True it also holds the SQNR with every layer quantized (on a deep copy).

    layer_kwargs go to the layers' from_dense (act_bits, pow2_scales, ...). "w8a8_static" needs
    the layers calibrated first (sparseq.quant.calibrate). The model is left as it was, also on error.
    """
    layer_cls = check_scheme(scheme)
    batches = list(iter_batches(calib_data, max_batches=max_batches))
    layers = quantizable_layers(model, filter_fn, skip)
    if not layers:
        raise ValueError(f"sensitivity: the {type(model).__name__} has no Linear layers to quantize")
    reference = model_outputs(model, batches)
    results = []
    for name, module in layers.items():
        names = _names_of(model, module)
        quantized = layer_cls.from_dense(module, **layer_kwargs)
        _put(model, names, quantized)
        try:
            results.append((name, outputs_sqnr_db(reference, model_outputs(model, batches))))
        finally:
            _put(model, names, module)
    results.sort(key=lambda item: item[1])
    report = SensitivityReport(scheme, results)
    if full:
        report.full_sqnr_db = quantized_sqnr_db(model, batches, scheme, filter_fn=filter_fn, skip=skip,
                                                reference=reference, **layer_kwargs)
    return report


def quantized_sqnr_db(model: nn.Module, calib_data: Iterable[Any], scheme: str = "w8a8",
                      filter_fn: Optional[FilterFn] = None, skip: Iterable[str] = (),
                      max_batches: Optional[int] = None, reference: Optional[List[torch.Tensor]] = None,
                      **layer_kwargs) -> float:
    """SQNR in dB of the output of ``quantize_(deep copy of model, scheme, ...)`` against the
    float model's, over ``calib_data``; ``model`` itself is not changed. reference: the float
    outputs when already computed (model_outputs on the same batches)."""
    batches = list(iter_batches(calib_data, max_batches=max_batches))
    if reference is None:
        reference = model_outputs(model, batches)
    quantized = quantize_(copy.deepcopy(model), scheme, filter_fn=filter_fn, skip=skip, **layer_kwargs)
    return outputs_sqnr_db(reference, model_outputs(quantized, batches))


def pow2_scale_cost(model: nn.Module, calib_data: Iterable[Any], scheme: str = "w8a8",
                    max_batches: Optional[int] = None, **layer_kwargs) -> Dict[str, float]:
    """The accuracy cost of power-of-two scales: the output SQNR (dB) of ``model`` quantized with
    ``scheme`` and free scales ("free_db"), with pow2_scales=True ("pow2_db"), and their
    difference ("cost_db" = free_db - pow2_db). ``model`` itself is not changed."""
    batches = list(iter_batches(calib_data, max_batches=max_batches))
    reference = model_outputs(model, batches)
    free = quantized_sqnr_db(model, batches, scheme, reference=reference, pow2_scales=False, **layer_kwargs)
    pow2 = quantized_sqnr_db(model, batches, scheme, reference=reference, pow2_scales=True, **layer_kwargs)
    return {"free_db": free, "pow2_db": pow2, "cost_db": free - pow2}
