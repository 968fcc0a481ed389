"""Compression recipes: the steps ``sparseq.compress`` runs, read and checked before any runs.

A recipe is a list of one-key dicts, ``{step: {option: value, ...}}``, run in order:

    - prune: {method: wanda, sparsity: 0.5, pattern: "2:4", ignore: ["pooler.*"]}
    - distill: {epochs: 1}
    - quantize: {scheme: w8a8, smoothquant: 0.5}

given as a Python list, a YAML file holding that list (read with ``yaml.safe_load``), or the name
of a preset (PRESETS). Steps are numbered from 1 in error messages. Every option is checked here;
an unknown step, key or value, a value of the wrong type, or steps in an order that cannot work
raises :class:`RecipeError` (a ValueError) naming the step, the key and what is allowed.

Steps and their options (defaults in brackets):

prune
  method       magnitude | wanda | sparsegpt | structured  (required)
  sparsity     fraction of weights zeroed, in [0, 1); "ratio" is accepted as its other name
               (for structured the key is ratio: the fraction of units removed)
  pattern      "unstructured" ["unstructured"] | "n:m" such as "2:4" | [bh, bw] blocks
               (magnitude, wanda, sparsegpt; an n:m pattern fixes the sparsity at 1 - n/m)
  ignore       fnmatch module-name patterns left alone [[]]
  magnitude:   scope global | layer [global]; targets [Linear] (also Conv1d, Conv2d, Conv3d)
  wanda:       max_batches [null]; sequential [true]
  sparsegpt:   max_batches [null]; sequential [true]; blocksize [128]; percdamp [0.01]
  structured:  importance l2 | l1 | activation [l2]; targets a subset of linear, conv, ffn,
               heads [all]; round_to [1]
distill        trains the model as the student of the teacher (sparseq.distill.Distiller)
  epochs       passes over the training data [1 when steps is not given]
  steps        optimizer steps (with epochs too: whichever ends first) [null]
  lr           Adam learning rate [1e-4]
  temperature  [4.0]; alpha [0.5]: the Distiller's KD temperature and soft/hard balance
  features     {student module: teacher module}, or a list of module names matched to the
               same name in the teacher [{}]
quantize       at most one, and the last step
  scheme       w8a8 | w8a8_static | w8a16 [w8a8]
  act_bits     w8a8: auto | 7 | 8 [auto]; w8a8_static: 7 | 8 [8]
  smoothquant  SmoothQuant alpha in [0, 1], or null for none [null] (w8a8, w8a8_static)
  observer     minmax | percentile | mse [minmax] (w8a8_static: calibrates activation ranges)
  pow2_scales  power-of-two scales [false] (not after an unstructured prune step: the sparse
               int8 layers keep exact per-channel scales)
  skip         fnmatch module-name patterns left in float [[]]
  skip_sensitive  also leave in float the k layers whose quantization hurts most [0]
  min_sqnr_db  also leave in float every layer below this output SQNR [null]
  fuse_gelu    w8a8, w8a8_static: fold each GELU right after an int8 layer into its kernel
               (sparseq.quant.fuse_gelu_) [true]
  embeddings   null | 8 | 4: also store every nn.Embedding table as 8- or 4-bit codes
               (sparseq.quant.quantize_embeddings_: smaller files, same speed) [null]

Order rules: quantize comes last (nothing prunes or trains int8 layers); a structured prune step
cannot follow an unstructured one (the earlier masks would no longer fit the shrunk layers).

Presets (PRESETS, each defined once as a recipe; a preset means the same whatever data is given,
and says which data it needs):

  "w8a8"          dynamic W8A8 (Int8Linear); needs no data. SmoothQuant is left out so the
                  preset runs without calibration data; add a quantize step with smoothquant
                  in a recipe to use it.
  "w8a16"         int8 weights, float activations (Int8WeightOnlyLinear); needs no data.
  "2:4"           SparseGPT 2:4 on every Linear (SparseLinear, 2:4 format); needs calib_data.
  "2:4+w8a8"      the same, then int8: 2:4 SparseInt8Linear; needs calib_data.
  "sparse90"      SparseGPT at 90% per layer, then one epoch of distillation from the dense model
                  on train_data (calib_data when train_data is not given); needs calib_data.
  "sparse90+w8a8" the same, then int8 (SparseInt8Linear in CSR); needs calib_data.

Why SparseGPT for 90%: its weight update keeps far more of each layer's output than magnitude
pruning at high sparsity, and a per-layer 90% leaves every layer sparse enough for the CSR kernel
(a global magnitude ranking leaves some layers too dense to gain anything and empties others).
At 90% one-shot pruning alone still loses much of the model, hence the distillation; SparseGPT
needs calib_data anyway, so the distillation always has data and the preset never changes
meaning with what is passed.
"""
from __future__ import annotations

import copy
import math
import numbers
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from .prune.patterns import SCOPES, check_sparsity, parse_pattern
from .prune.structured import GROUP_KINDS
from .quant.observers import OBSERVERS

__all__ = ["PRESETS", "STEP_KINDS", "PRUNE_METHODS", "TARGET_CLASSES", "RecipeError", "Step",
           "load_recipe", "recipe_as_list", "check_inputs"]

STEP_KINDS = ("prune", "distill", "quantize")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "structured")
# The module classes a magnitude prune step's ``targets`` may name.
TARGET_CLASSES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}

_SPARSEGPT_2_4 = {"prune": {"method": "sparsegpt", "pattern": "2:4"}}
_SPARSEGPT_90 = {"prune": {"method": "sparsegpt", "sparsity": 0.9}}
_ONE_EPOCH = {"distill": {"epochs": 1}}
_W8A8 = {"quantize": {"scheme": "w8a8"}}
PRESETS: Dict[str, List[Dict[str, Dict[str, Any]]]] = {
    "w8a8": [_W8A8],
    "w8a16": [{"quantize": {"scheme": "w8a16"}}],
    "2:4": [_SPARSEGPT_2_4],
    "2:4+w8a8": [_SPARSEGPT_2_4, _W8A8],
    "sparse90": [_SPARSEGPT_90, _ONE_EPOCH],
    "sparse90+w8a8": [_SPARSEGPT_90, _ONE_EPOCH, _W8A8],
}


class RecipeError(ValueError):
    """A recipe that cannot run: unknown steps, keys or values, wrong types, impossible orders,
    missing data. Raised before anything is modified."""


class _Invalid(Exception):
    """A value check failed; the message says what is allowed (the caller adds where)."""


# --------------------------------------------------------------------------------------------
# Value checks: each returns the normalised (JSON-able) value or raises _Invalid.


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _one_of(*allowed: Any) -> Callable[[Any], Any]:
    def check(value):
        for option in allowed:
            if type(value) is type(option) and value == option:
                return value
        raise _Invalid(f"{value!r} is not one of {', '.join(map(repr, allowed))}")
    return check


def _number(low: float, high: float, high_open: bool = False, low_open: bool = False,
            allow_none: bool = False) -> Callable[[Any], Any]:
    def check(value):
        if value is None and allow_none:
            return None
        inside = _is_number(value) and (low < value if low_open else low <= value) and \
            (value < high if high_open else value <= high)
        if not inside:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise _Invalid(f"expected a number in {span}{' or null' if allow_none else ''}, got {value!r}")
        return float(value)
    return check


def _count(minimum: int, allow_none: bool = False) -> Callable[[Any], Any]:
    def check(value):
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _Invalid(f"expected an integer >= {minimum}{' or null' if allow_none else ''}, "
                           f"got {value!r}")
        return int(value)
    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {value!r}")
    return value


def _names(value: Any) -> List[str]:
    """fnmatch patterns or module names: one string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise _Invalid(f"expected a string or a list of strings, got {value!r}")


def _subset_of(allowed: Sequence[str]) -> Callable[[Any], List[str]]:
    def check(value):
        names = _names(value)
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise _Invalid(f"expected a non-empty list drawn from {', '.join(allowed)}, got {value!r}")
        return names
    return check


def _pattern(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        hint = ""
        if value >= 60:  # YAML 1.1 reads an unquoted n:m as a base-60 number: 2:4 -> 124
            hint = f' (an unquoted {value // 60}:{value % 60} in YAML reads as the number {value}: quote it)'
        raise _Invalid(f"expected \"unstructured\", an \"n:m\" string or [bh, bw], got {value!r}{hint}")
    try:
        pattern = parse_pattern(value)
    except (TypeError, ValueError) as exc:
        raise _Invalid(str(exc)) from None
    if pattern.kind == "block":
        return list(pattern.block)
    return str(pattern)


def _features(value: Any) -> Dict[str, str]:
    if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    try:
        return {name: name for name in _names(value)}
    except _Invalid:
        raise _Invalid(f"expected {{student module: teacher module}} or a list of module names, "
                       f"got {value!r}") from None


# --------------------------------------------------------------------------------------------
# Which keys each step takes: key -> (check, default). _REQUIRED marks keys without a default.

_REQUIRED = object()
_Spec = Dict[str, Tuple[Callable[[Any], Any], Any]]

_IGNORE = {"ignore": (_names, [])}
_CALIBRATED = {"max_batches": (_count(1, allow_none=True), None), "sequential": (_boolean, True)}
_FRACTION = (_number(0.0, 1.0, high_open=True, allow_none=True), None)
_PRUNE_SPECS: Dict[str, _Spec] = {
    "magnitude": {"sparsity": _FRACTION, "pattern": (_pattern, "unstructured"),
                  "scope": (_one_of(*SCOPES), "global"),
                  "targets": (_subset_of(tuple(TARGET_CLASSES)), ["Linear"]), **_IGNORE},
    "wanda": {"sparsity": _FRACTION, "pattern": (_pattern, "unstructured"), **_IGNORE, **_CALIBRATED},
    "sparsegpt": {"sparsity": _FRACTION, "pattern": (_pattern, "unstructured"), **_IGNORE, **_CALIBRATED,
                  "blocksize": (_count(1), 128),
                  "percdamp": (_number(0.0, math.inf, low_open=True, high_open=True), 0.01)},
    "structured": {"ratio": (_number(0.0, 1.0, high_open=True), _REQUIRED),
                   "importance": (_one_of("l2", "l1", "activation"), "l2"),
                   "targets": (_subset_of(GROUP_KINDS), list(GROUP_KINDS)), **_IGNORE,
                   "round_to": (_count(1), 1)},
}
_DISTILL_SPEC: _Spec = {
    "epochs": (_count(1, allow_none=True), None), "steps": (_count(1, allow_none=True), None),
    "lr": (_number(0.0, math.inf, low_open=True, high_open=True), 1e-4),
    "temperature": (_number(0.0, math.inf, low_open=True, high_open=True), 4.0),
    "alpha": (_number(0.0, 1.0), 0.5), "features": (_features, {}),
}
_QUANTIZE_COMMON: _Spec = {
    "pow2_scales": (_boolean, False), "skip": (_names, []), "skip_sensitive": (_count(0), 0),
    "min_sqnr_db": (_number(-math.inf, math.inf, low_open=True, high_open=True, allow_none=True), None),
    "embeddings": (_one_of(None, 8, 4), None),
}
_SMOOTHQUANT = {"smoothquant": (_number(0.0, 1.0, allow_none=True), None)}
_FUSE_GELU = {"fuse_gelu": (_boolean, True)}
_QUANTIZE_SPECS: Dict[str, _Spec] = {
    "w8a8": {"act_bits": (_one_of("auto", 7, 8), "auto"), **_SMOOTHQUANT, **_FUSE_GELU, **_QUANTIZE_COMMON},
    "w8a8_static": {"act_bits": (_one_of(7, 8), 8), **_SMOOTHQUANT, **_FUSE_GELU,
                    "observer": (_one_of(*sorted(OBSERVERS)), "minmax"), **_QUANTIZE_COMMON},
    "w8a16": dict(_QUANTIZE_COMMON),
}

# Why a key another variant takes is refused here (added to the "not an option" message).
_WHY_NOT = {
    "pattern": "structured pruning removes whole neurons and heads; it has no sparsity pattern",
    "scope": "only magnitude ranks weights across layers",
    "smoothquant": "weight-only int8 keeps activations in float: there are no activation outliers to move",
    "act_bits": "weight-only int8 keeps activations in float",
    "observer": "only w8a8_static calibrates activation ranges",
    "fuse_gelu": "only the W8A8 kernels fuse an activation into their epilogue",
}


# --------------------------------------------------------------------------------------------
# Steps


@dataclass(frozen=True)
class Step:
    """One checked recipe step: ``kind`` (prune / distill / quantize) and its ``options`` with
    every default filled in; ``number`` counts from 1; ``source`` names the recipe it came from."""
    number: int
    kind: str
    options: Dict[str, Any]
    source: str = "recipe"

    @property
    def label(self) -> str:
        if self.kind == "prune":
            return f"prune, method {self.options['method']!r}"
        if self.kind == "quantize":
            return f"quantize, scheme {self.options['scheme']!r}"
        return self.kind

    @property
    def where(self) -> str:
        return f"{self.source} step {self.number} ({self.label})"

    @property
    def unstructured_prune(self) -> bool:
        """A prune step that leaves zeros in the weights (every method but structured)."""
        return self.kind == "prune" and self.options["method"] != "structured"

    def as_dict(self) -> Dict[str, Dict[str, Any]]:
        return {self.kind: copy.deepcopy(self.options)}

    def calib_reason(self) -> Optional[str]:
        """Why this step needs calib_data, or None when it does not."""
        options = self.options
        if self.kind == "prune":
            method = options["method"]
            if method == "wanda":
                return "Wanda scores weights by their input activations"
            if method == "sparsegpt":
                return "SparseGPT builds each layer's input Hessian from calibration data"
            if method == "structured":
                return ("structured pruning traces the model on an example batch (the first calibration "
                        "batch)" + (" and scores units by their activations"
                                    if options["importance"] == "activation" else ""))
        if self.kind == "quantize":
            if options.get("smoothquant") is not None:
                return "SmoothQuant measures activation ranges"
            if options["scheme"] == "w8a8_static":
                return "w8a8_static calibrates activation ranges"
            if options["skip_sensitive"] or options["min_sqnr_db"] is not None:
                return "skip_sensitive / min_sqnr_db measure each layer's sensitivity"
        return None


def _fail(where: str, message: str) -> RecipeError:
    return RecipeError(f"{where}: {message}")


def _normalise(options: Mapping[str, Any], spec: _Spec, where: str, variant: str) -> Dict[str, Any]:
    unknown = [key for key in options if key not in spec]
    if unknown:
        key = unknown[0]
        why = f" ({_WHY_NOT[key]})" if key in _WHY_NOT else ""
        raise _fail(where, f"key {key!r} is not an option of {variant}{why}; allowed keys: "
                           f"{', '.join(sorted(spec))}")
    normalised = {}
    for key, (check, default) in spec.items():
        if key in options:
            try:
                normalised[key] = check(options[key])
            except _Invalid as exc:
                raise _fail(where, f"key {key!r}: {exc}") from None
        elif default is _REQUIRED:
            raise _fail(where, f"key {key!r} is required")
        else:
            normalised[key] = copy.deepcopy(default)
    return normalised


def _prune_options(options: Dict[str, Any], step: str) -> Dict[str, Any]:
    where = f"{step} (prune)"
    if "method" not in options:
        raise _fail(where, f"key 'method' is required; one of {', '.join(PRUNE_METHODS)}")
    method = options.pop("method")
    if method not in PRUNE_METHODS:
        raise _fail(where, f"key 'method': {method!r} is not one of {', '.join(PRUNE_METHODS)}")
    where = f"{step} (prune, method {method!r})"
    amount_key = "ratio" if method == "structured" else "sparsity"
    other_key = "sparsity" if amount_key == "ratio" else "ratio"
    if other_key in options:
        if amount_key in options:
            raise _fail(where, "give one of 'sparsity' and 'ratio' (two names of the same amount), not both")
        options[amount_key] = options.pop(other_key)
    normalised = {"method": method, **_normalise(options, _PRUNE_SPECS[method], where, f"method {method!r}")}
    if "pattern" in normalised:
        try:
            normalised["sparsity"] = check_sparsity(normalised["sparsity"], parse_pattern(normalised["pattern"]))
        except (TypeError, ValueError) as exc:
            raise _fail(where, f"key 'sparsity': {exc}") from None
    return normalised


def _distill_options(options: Dict[str, Any], step: str) -> Dict[str, Any]:
    normalised = _normalise(options, _DISTILL_SPEC, f"{step} (distill)", "distill")
    if normalised["epochs"] is None and normalised["steps"] is None:
        normalised["epochs"] = 1
    return normalised


def _quantize_options(options: Dict[str, Any], step: str) -> Dict[str, Any]:
    scheme = options.pop("scheme", "w8a8")
    if scheme not in _QUANTIZE_SPECS:
        raise _fail(f"{step} (quantize)", f"key 'scheme': {scheme!r} is not one of {', '.join(_QUANTIZE_SPECS)}")
    where = f"{step} (quantize, scheme {scheme!r})"
    return {"scheme": scheme, **_normalise(options, _QUANTIZE_SPECS[scheme], where, f"scheme {scheme!r}")}


_OPTION_PARSERS = {"prune": _prune_options, "distill": _distill_options, "quantize": _quantize_options}


def _parse_step(number: int, item: Any, source: str) -> Step:
    where = f"{source} step {number}"
    if isinstance(item, str):  # a bare step name (YAML "- distill") takes every default
        item = {item: {}}
    if not (isinstance(item, Mapping) and len(item) == 1):
        raise _fail(where, f"a step is a one-key dict {{step: {{option: value}}}} with step one of "
                           f"{', '.join(STEP_KINDS)}; got {item!r}")
    (kind, options), = item.items()
    if kind not in STEP_KINDS:
        raise _fail(where, f"unknown step {kind!r}; steps are {', '.join(STEP_KINDS)}")
    if options is None:  # YAML "- distill:" with nothing after it
        options = {}
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise _fail(f"{where} ({kind})", f"the options must be a dict of named keys, got {options!r}")
    return Step(number, kind, _OPTION_PARSERS[kind](dict(options), where), source)


def _check_order(steps: List[Step]) -> None:
    quantize = None
    unstructured = None
    for step in steps:
        if quantize is not None:
            raise _fail(step.where, f"comes after the quantize step {quantize.number}; quantize must be "
                                    "the last step (int8 layers cannot be pruned, trained or quantized again)")
        if step.kind == "quantize":
            quantize = step
            if step.options["pow2_scales"] and unstructured is not None:
                raise _fail(step.where, f"pow2_scales cannot follow the prune step {unstructured.number}: "
                                        "the sparse int8 layers keep exact per-channel scales")
        elif step.kind == "prune" and step.options["method"] == "structured" and unstructured is not None:
            raise _fail(step.where, f"a structured prune step cannot follow the prune step "
                                    f"{unstructured.number}: its masks would no longer fit the shrunk "
                                    "layers; put structured first")
        if step.unstructured_prune and unstructured is None:
            unstructured = step


def _read_yaml(path: pathlib.Path) -> Any:
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read the recipe file {str(path)!r}: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {exc}") from None


def _looks_like_file(recipe: str) -> bool:
    return recipe.lower().endswith((".yaml", ".yml")) or os.path.isfile(recipe)


def load_recipe(recipe: Any) -> List[Step]:
    """The checked steps of ``recipe``: a preset name (PRESETS), a YAML file (a str or
    pathlib.Path ending .yaml / .yml, or any existing file) holding a list of steps, or a list of
    one-key step dicts. Raises RecipeError (FileNotFoundError for a missing file)."""
    if isinstance(recipe, str) and recipe in PRESETS:
        raw, source = copy.deepcopy(PRESETS[recipe]), f"preset {recipe!r}"
    elif isinstance(recipe, (str, os.PathLike)):
        if isinstance(recipe, str) and not _looks_like_file(recipe):
            raise RecipeError(f"unknown recipe {recipe!r}: not a preset ({', '.join(PRESETS)}) nor a "
                              "YAML file (.yaml / .yml)")
        path = pathlib.Path(recipe)
        raw, source = _read_yaml(path), f"recipe file {path.name!r}"
        if not isinstance(raw, list):
            raise RecipeError(f"{source} must hold a list of steps (- prune: {{...}}), got "
                              f"{type(raw).__name__}")
    elif isinstance(recipe, (list, tuple)):
        raw, source = list(recipe), "recipe"
    else:
        raise RecipeError(f"a recipe is a preset name ({', '.join(PRESETS)}), a YAML file path or a "
                          f"list of steps, got {type(recipe).__name__}")
    if not raw:
        raise RecipeError(f"{source} has no steps")
    steps = [_parse_step(number, item, source) for number, item in enumerate(raw, start=1)]
    _check_order(steps)
    return steps


def recipe_as_list(steps: Sequence[Step]) -> List[Dict[str, Dict[str, Any]]]:
    """The normalised recipe, JSON-able; load_recipe of it gives the same steps back."""
    return [step.as_dict() for step in steps]


def check_inputs(steps: Sequence[Step], has_calib: bool, has_train: bool, has_teacher: bool) -> None:
    """Refuse a recipe whose steps lack the data they need: calib_data for Wanda, SparseGPT,
    structured pruning, SmoothQuant, static calibration and sensitivity; train_data or
    calib_data for distillation; and a distill step with the default teacher but no prune step
    before it (the student would be its own teacher)."""
    pruned = False
    for step in steps:
        reason = step.calib_reason()
        if reason and not has_calib:
            raise _fail(step.where, f"needs calib_data ({reason}); pass calib_data=<an iterable of batches>")
        if step.kind == "distill":
            if not (has_train or has_calib):
                raise _fail(step.where, "needs training data: pass train_data=<(inputs, labels) batches> "
                                        "or calib_data=<input batches>")
            if not (has_teacher or pruned):
                raise _fail(step.where, "has nothing to learn: with the default teacher (a copy of the model "
                                        "before the first step) a distill step must follow a prune step; "
                                        "pass teacher= to distil from another model")
        pruned = pruned or step.kind == "prune"
