"""compress: run a recipe's steps on a model and convert it to sparseq's kernels, in one call.

What a model becomes, per layer (the conversion that ends every recipe):

============  ================================  =========================================
quantize      a pruned layer, sparse enough      every other nn.Linear (unpruned, ignored,
scheme        for a sparse kernel                or too dense for a sparse kernel)
============  ================================  =========================================
(none)        SparseLinear (csr / 2:4 / bsr)     left as it is (float nn.Linear)
w8a16         SparseInt8Linear, float activ.     Int8WeightOnlyLinear
w8a8          SparseInt8Linear, float activ.;    Int8Linear
              a 2:4 layer with act_bits 7 or 8
              given explicitly: int8 activ.
w8a8_static   SparseInt8Linear, float activ.     Int8StaticLinear (calibrated)
============  ================================  =========================================

"Sparse enough" is SparseLinear's format="auto" rule (sparseq.nn.choose_format: a 2:4 pattern,
full blocks, or at least 60% unstructured zeros); a layer with fewer zeros would run slower
sparse, so it keeps its zeros in the scheme's dense layer. Sparse int8 keeps float activations
(weight-only int8 of the nonzeros) by default because that is the faster and more accurate
kernel on CPUs without VNNI; only the 2:4 kernel takes int8 activations, and there is no static
sparse kernel. Structured pruning leaves smaller dense layers (no zeros), which quantize like any
other. Layers matching the quantize step's ``skip`` stay in float (sparse float if pruned).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Sized, Tuple

import torch
import torch.nn as nn

from .calib import all_or_nothing
from .convert import name_matches, swap_modules
from .distill import Distiller
from .nn import QuantizedEmbedding, SparseInt8Linear, SparseLinear, choose_format
from .nn._frozen import FrozenLinearBase
from .nn.sparse_linear import FormatChoice
from .prune import Masks, magnitude, sparsegpt, structured, wanda
from .prune.masks import layers_to_prune
from .quant import calibrate, fuse_gelu_, quantize_, quantize_embeddings_, smooth_quant
from .quant.quantize import KEEP_AS_LINEAR, quantizable_layers
from .recipes import (PRESETS, TARGET_CLASSES, RecipeError, Step, check_inputs, load_recipe,
                      recipe_as_list)

__all__ = ["compress", "CompressReport", "PRESETS"]

logger = logging.getLogger("sparseq.compression")

_PRUNERS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}


@dataclass
class CompressReport:
    """What compress did: one (step, outcome) line per step, then the conversion."""
    lines: List[Tuple[str, str]] = field(default_factory=list)

    def table(self) -> str:
        width = max((len(what) for what, _ in self.lines), default=0)
        return "\n".join(f"{what:<{width}}  {outcome}" for what, outcome in self.lines)

    def __str__(self) -> str:
        return self.table()


def compress(model: nn.Module, recipe: Any, calib_data: Optional[Iterable[Any]] = None,
             teacher: Optional[nn.Module] = None, train_data: Optional[Iterable[Any]] = None, *,
             progress: Optional[bool] = None) -> nn.Module:
    """Run ``recipe``'s steps on ``model`` in order, convert it to sparseq's layers, in place;
    return ``model``.

    recipe: a preset name ("w8a8", "w8a16", "2:4", "2:4+w8a8", "sparse90", "sparse90+w8a8"), a
      YAML file, or a list of steps such as
      ``[{"prune": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}}, {"distill": {"epochs": 1}},
      {"quantize": {"scheme": "w8a8", "smoothquant": 0.5}}]``; see sparseq.recipes for every
      step's options and what each preset means and needs.
    calib_data: an iterable of input batches by the sparseq.calib convention (dict ->
      model(**b), tuple/list -> model(*b), tensor -> model(b)); needed by Wanda, SparseGPT,
      structured pruning, SmoothQuant, w8a8_static and skip_sensitive. A one-shot iterator is
      read into a list once, since several steps read the data.
    teacher: the model a distill step learns from; by default a copy of ``model`` taken before
      the first step changes it.
    train_data: ``(inputs, labels)`` batches (labels may be None), as Distiller.fit takes them,
      for distill steps; without it they train on calib_data (each batch as ``(batch, None)``).
    progress: a bar over the steps (None: when stderr is a terminal).

    Order: the steps run as listed; masks of prune steps stay attached through later distill
    steps (the zeros are held) and are re-applied after a later prune step. The quantize step
    (always last) runs SmoothQuant on the layers that will quantize activations, then
    calibration (w8a8_static), then turns pruned layers into sparse kernels and every other
    nn.Linear into the scheme's int8 layer (the table in this module's docstring). Without a
    quantize step, pruned layers become SparseLinear where sparse enough.

    Everything that can be checked is checked before the model is touched (unknown steps, keys
    and values, impossible orders, missing data, patterns that do not fit the model's layers):
    RecipeError (a ValueError). A step that fails part way restores the model as it was
    (parameters, buffers, submodules, attributes) and re-raises naming the step.
    Afterwards ``model.sparseq_recipe`` holds the normalised steps (JSON-able; earlier recipes
    of the same model first) and ``model.sparseq_report`` a CompressReport, also logged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError("compress swaps submodules in place and cannot replace the model itself; wrap a "
                         "single layer in an nn.Sequential")
    steps = load_recipe(recipe)
    calib_data = _reusable(calib_data, "calib_data")
    train_data = _reusable(train_data, "train_data")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if teacher is model:
        raise ValueError("teacher is the model itself; pass a separate model (or None for a copy of this one)")
    check_inputs(steps, calib_data is not None, train_data is not None, teacher is not None)
    _check_against_model(steps, model, teacher, train_data)
    if teacher is None and any(step.kind == "distill" for step in steps):
        teacher = _frozen_copy(model)

    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    runner = _Runner(model, calib_data, train_data, teacher, show)
    report = CompressReport()
    with all_or_nothing(model), _structure_restored_on_error(model):
        for step in tqdm(steps, desc="compress", unit="step", disable=not show):
            with _naming_failures(step.where):
                report.lines.append((f"{step.number}. {step.label}", runner.run(step)))
        if steps[-1].kind != "quantize":
            with _naming_failures("the final conversion"):
                report.lines.append(("conversion", runner.convert(None)))
    model.sparseq_recipe = list(getattr(model, "sparseq_recipe", None) or []) + recipe_as_list(steps)
    model.sparseq_report = report
    logger.info("compress:\n%s", report)
    return model


# --------------------------------------------------------------------------------------------
# Checks before anything runs


def _reusable(data: Any, what: str) -> Any:
    """``data`` as something every step can iterate again: a one-shot iterator is read into a
    list; a lone tensor or dict (one batch, not a list of them) and non-iterables are refused."""
    if data is None:
        return None
    if isinstance(data, (torch.Tensor, Mapping)):
        raise TypeError(f"{what} must be an iterable of batches (a list, a DataLoader, ...), not a single "
                        f"{type(data).__name__}; wrap one batch as [batch]")
    if isinstance(data, Iterator):
        data = list(data)
    else:
        try:
            iter(data)
        except TypeError:
            raise TypeError(f"{what} must be an iterable of batches, got {type(data).__name__}") from None
    if hasattr(data, "__len__") and len(data) == 0:
        raise ValueError(f"{what} is empty: at least one batch is needed")
    return data


def _check_against_model(steps: Sequence[Step], model: nn.Module, teacher: Optional[nn.Module],
                         train_data: Any) -> None:
    """The checks that need the model: prune steps find layers their pattern fits (until a
    structured step changes the shapes), distill features name real modules, train_data holds
    (inputs, labels) pairs."""
    shapes_known = True
    for step in steps:
        options = step.options
        if step.kind == "prune" and options["method"] == "structured":
            shapes_known = False
        elif step.kind == "prune" and shapes_known:
            try:
                layers_to_prune(model, options["sparsity"], options["pattern"], _prune_targets(options),
                                options["ignore"])
            except (TypeError, ValueError) as exc:
                raise RecipeError(f"{step.where}: {exc}") from None
        elif step.kind == "distill":
            for side, owner, names in (("student", model, options["features"].keys()),
                                       ("teacher", teacher if teacher is not None else model,
                                        options["features"].values())):
                for name in names:
                    try:
                        owner.get_submodule(name)
                    except AttributeError:
                        raise RecipeError(f"{step.where}: key 'features': the {side} has no module "
                                          f"{name!r}") from None
    if not any(step.kind == "distill" for step in steps):
        for name, value in (("train_data", train_data), ("teacher", teacher)):
            if value is not None:
                logger.warning("compress: %s is given but the recipe has no distill step; it is not used", name)
    elif isinstance(train_data, Sequence):
        first = train_data[0]
        if not (isinstance(first, (tuple, list)) and len(first) == 2):
            raise TypeError(f"train_data batches are (inputs, labels) pairs (labels may be None), as "
                            f"Distiller.fit takes them; the first is a {type(first).__name__}")


def _prune_targets(options: Mapping[str, Any]) -> Tuple[type, ...]:
    return tuple(TARGET_CLASSES[name] for name in options.get("targets", ["Linear"]))


def _frozen_copy(model: nn.Module) -> nn.Module:
    """The default teacher: a copy of the model as it is now, without gradients."""
    try:
        teacher = copy.deepcopy(model)
    except Exception as exc:
        raise TypeError(f"cannot copy the model to make the default teacher ({type(exc).__name__}: {exc}); "
                        "pass teacher= explicitly") from exc
    return teacher.requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Restoring a model after a failed step


@contextlib.contextmanager
def _naming_failures(where: str):
    """Re-raise an error from the block with ``where`` and "the model was restored" in its
    message (same type where the type allows), so the caller learns which step failed."""
    try:
        yield
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as exc:
        try:
            renamed = type(exc)(f"{where} failed and the model was restored: {exc}")
        except Exception:
            raise exc from None
        raise renamed from exc


@contextlib.contextmanager
def _structure_restored_on_error(model: nn.Module):
    """Put back every module's submodules, parameter and buffer slots and attributes as they
    were on entry if the block raises. calib.all_or_nothing restores tensor values but not
    module swaps (structured pruning, sparse and int8 conversion) or attributes a pass leaves
    (act_observer, structured_report, head counts); used inside it, the model is whole again."""
    saved = [(module, dict(module.__dict__),
              {slot: dict(getattr(module, slot)) for slot in ("_modules", "_parameters", "_buffers")})
             for module in model.modules()]
    try:
        yield
    except BaseException:
        for module, attributes, slots in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for slot, entries in slots.items():
                getattr(module, slot).clear()
                getattr(module, slot).update(entries)
        raise


# --------------------------------------------------------------------------------------------
# Running the steps


class _Runner:
    def __init__(self, model: nn.Module, calib_data: Any, train_data: Any, teacher: Optional[nn.Module],
                 show: bool) -> None:
        self.model = model
        self.calib_data = calib_data
        self.train_data = train_data
        self.teacher = teacher
        self.show = show
        self.masks: List[Masks] = []

    def run(self, step: Step) -> str:
        return {"prune": self.prune, "distill": self.distill, "quantize": self.convert}[step.kind](step.options)

    def prune(self, options: Dict[str, Any]) -> str:
        method = options["method"]
        if method == "structured":
            example_inputs = next(iter(self.calib_data))
            structured(self.model, options["ratio"], example_inputs, importance=options["importance"],
                       targets=options["targets"], ignore=options["ignore"], round_to=options["round_to"],
                       calib_data=self.calib_data if options["importance"] == "activation" else None)
            report = self.model.structured_report
            return (f"{len(report.groups)} groups shrunk, parameters {report.params_before:,} -> "
                    f"{report.params_after:,}")
        arguments = dict(pattern=options["pattern"], ignore=options["ignore"])
        if method == "magnitude":
            masks = magnitude(self.model, options["sparsity"], scope=options["scope"],
                              targets=_prune_targets(options), **arguments)
        else:
            arguments.update(max_batches=options["max_batches"], sequential=options["sequential"])
            if method == "sparsegpt":
                arguments.update(blocksize=options["blocksize"], percdamp=options["percdamp"])
            masks = _PRUNERS[method](self.model, self.calib_data, options["sparsity"], **arguments)
        for earlier in self.masks:  # a later pass (SparseGPT's update) may have moved earlier zeros
            earlier.apply()
        self.masks.append(masks)
        return f"{len(masks)} layers, {masks.sparsity():.1%} of their weights zeroed"

    def distill(self, options: Dict[str, Any]) -> str:
        on_train = self.train_data is not None
        loader = self.train_data if on_train else _inputs_only(self.calib_data)
        distiller = Distiller(self.teacher, self.model, temperature=options["temperature"],
                              alpha=options["alpha"], features=options["features"] or None)
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("the model has no trainable parameters to distil into")
        optimizer = torch.optim.Adam(parameters, lr=options["lr"])
        for masks in self.masks:
            masks.attach(optimizer)
        try:
            # With steps alone, one epoch per step is always enough batches.
            losses = distiller.fit(loader, optimizer, epochs=options["epochs"] or options["steps"],
                                   max_steps=options["steps"], progress=self.show)
        finally:
            for masks in self.masks:
                masks.detach()
        return (f"{len(losses)} steps on {'train_data' if on_train else 'calib_data'}, "
                f"loss {losses[0]:.4g} -> {losses[-1]:.4g}")

    def convert(self, options: Optional[Dict[str, Any]]) -> str:
        """The quantize step (options) or the bare conversion of pruned layers (None)."""
        model = self.model
        plan = self._sparse_plan(options)
        notes = []
        if options is not None:
            skip = list(options["skip"])
            if options.get("smoothquant") is not None:
                # Layers that keep float activations gain nothing from smoothing.
                keep = skip + [name for name, (_, _, act_bits) in plan.items() if act_bits is None]
                if quantizable_layers(model, skip=keep):
                    smoothing = smooth_quant(model, self.calib_data, alpha=options["smoothquant"], skip=keep)
                    notes.append(f"SmoothQuant smoothed {len(smoothing.smoothed_layers)} layers")
                else:
                    notes.append("SmoothQuant: no layer quantizes activations, nothing smoothed")
            if options["scheme"] == "w8a8_static" and quantizable_layers(model, skip=skip + list(plan)):
                calibrate(model, self.calib_data, observer=options["observer"], skip=skip + list(plan))
        replacements = {name: _sparse_layer(model.get_submodule(name), *entry) for name, entry in plan.items()}
        swap_modules(model, lambda module, name: replacements.get(name))
        if options is not None and quantizable_layers(model, skip=options["skip"]):
            layer_options = {key: options[key] for key in ("act_bits", "pow2_scales") if key in options}
            quantize_(model, options["scheme"], skip=options["skip"], skip_sensitive=options["skip_sensitive"],
                      min_sqnr_db=options["min_sqnr_db"], calib_data=self.calib_data, **layer_options)
        if options is not None and options.get("fuse_gelu"):
            fused = fuse_gelu_(model)
            if fused:
                notes.append(f"GELU fused into {len(fused)} int8 layers")
        if options is not None and options["embeddings"] is not None:
            quantize_embeddings_(model, bits=options["embeddings"], skip=options["skip"])
        return "; ".join(notes + [_layer_summary(model)])

    def _sparse_plan(self, options: Optional[Dict[str, Any]]) -> Dict[str, Tuple[FormatChoice, bool, Optional[int]]]:
        """name -> (format, int8, int8 activation bits or None) of every pruned nn.Linear sparse
        enough for a sparse kernel."""
        plan = {}
        for name in dict.fromkeys(name for masks in self.masks for name in masks):
            module = self.model.get_submodule(name)
            if not isinstance(module, nn.Linear) or isinstance(module, KEEP_AS_LINEAR):
                continue  # a pruned convolution keeps its zeros in place
            choice = choose_format(module.weight.detach())
            if choice.format == "dense":
                continue
            int8 = options is not None and not name_matches(name, options["skip"])
            act_bits = None  # float activations: the fastest sparse int8 kernel on the CPU
            if int8 and options["scheme"] == "w8a8" and choice.format == "2:4" and options["act_bits"] != "auto":
                act_bits = options["act_bits"]
            plan[name] = (choice, int8, act_bits)
        return plan


def _sparse_layer(linear: nn.Linear, choice: FormatChoice, int8: bool, act_bits: Optional[int]) -> nn.Module:
    if int8:
        layer = SparseInt8Linear.from_dense(linear, format=choice.format, block=choice.block, act_bits=act_bits)
    else:
        layer = SparseLinear.from_dense(linear, format=choice.format, block=choice.block)
    layer.format_reason = choice.reason
    return layer


def _layer_summary(model: nn.Module) -> str:
    """How many of each linear-like layer the model holds, e.g. "SparseInt8Linear[2:4] x12, Int8Linear x2"."""
    counts: Counter = Counter()
    for module in model.modules():
        if isinstance(module, SparseLinear):
            counts[f"{type(module).__name__}[{module.format}]"] += 1
        elif isinstance(module, (nn.Linear, FrozenLinearBase, QuantizedEmbedding)):
            counts[type(module).__name__] += 1
    return ", ".join(f"{name} x{count}" for name, count in counts.most_common()) or "no linear layers"


class _InputsOnly:
    """calib_data batches as Distiller.fit's (inputs, labels) pairs, without labels."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches

    def __iter__(self):
        return ((batch, None) for batch in self.batches)


class _SizedInputsOnly(_InputsOnly):
    def __len__(self) -> int:  # lets the Distiller's progress bar know the step count
        return len(self.batches)


def _inputs_only(batches: Iterable[Any]) -> _InputsOnly:
    return _SizedInputsOnly(batches) if isinstance(batches, Sized) else _InputsOnly(batches)
