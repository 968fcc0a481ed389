"""Compressed save and load: one safetensors file per model, nothing pickled.

``save(model, path, recipe=None)`` writes, and ``load(path, model=None)`` reads, one safetensors
file (https://github.com/huggingface/safetensors) that holds:

- the tensors of the model's ``state_dict`` exactly as the model keeps them: packed int8 codes,
  CSR / 2:4 / BSR values and indices, scales, biases and the weights of the plain modules, plus
  the model's non-persistent buffers (so a model rebuilt on the meta device gets them too). A
  tensor reachable under several names (tied weights, a module shared by two parents) is
  stored once, under its first name, and every other name is recorded as an alias of it;
- under the header metadata key ``"sparseq"``, one JSON document (its SHA-256 under
  ``"sparseq.sha256"``) with: the format name and version; the sparseq and torch versions that
  wrote it; the caller's ``recipe`` (any JSON value); the architecture (a ``transformers``
  class name and its config, or the tree of torch.nn modules with their constructor
  arguments, or the class of a model that only a skeleton can restore); for every sparseq
  layer its class, the constructor arguments that rebuild it empty, its ``_extra_state``, its
  weight format, shape and bytes; the ``_extra_state`` of any other module (JSON only); the
  dtype, shape and SHA-256 of every stored tensor; the aliases; the training flags.

Loading verifies the metadata and every tensor against their checksums before touching a model,
rebuilds each sparseq layer empty from its recorded arguments (on the meta device, never from a
dense weight) and loads all tensors strictly with ``assign=True``. A truncated or corrupted file,
a file without sparseq metadata, a newer format version or a file that does not fit the model
raises SparseqFileError (a ValueError) naming the file and the problem; a model that fails to
load is left as it was.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import sys
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from . import __version__ as _SPARSEQ_VERSION
from . import nn as sparseq_nn
from .calib import model_device
from .convert import _is_under
from .nn._frozen import FrozenLinearBase

FORMAT_NAME = "sparseq"
FORMAT_VERSION = 1
METADATA_KEY = "sparseq"
METADATA_CHECKSUM_KEY = "sparseq.sha256"


class SparseqFileError(ValueError):
    """A sparseq file that cannot be read, or does not fit the model it is loaded into."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


# ----------------------------------------------------------------------------------------------
# JSON values: tuples and torch dtypes tagged so they come back as they were
# ----------------------------------------------------------------------------------------------

_TUPLE_TAG = "__tuple__"
_DTYPE_TAG = "__dtype__"


def _to_json(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {_DTYPE_TAG: str(value).replace("torch.", "")}
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        bad = [key for key in value if not isinstance(key, str)]
        if bad:
            raise TypeError(f"{where} has a non-string key {bad[0]!r}; JSON keys are strings")
        if len(value) == 1 and next(iter(value)) in (_TUPLE_TAG, _DTYPE_TAG):
            raise TypeError(f"{where} is a dict whose only key is {next(iter(value))!r}, which "
                            "sparseq files reserve")
        return {key: _to_json(item, f"{where}.{key}") for key, item in value.items()}
    raise TypeError(f"{where} is a {type(value).__name__}; a sparseq file holds JSON values, tuples "
                    "and torch dtypes only (nothing is pickled)")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    if isinstance(value, dict):
        if len(value) == 1 and _TUPLE_TAG in value:
            return tuple(_from_json(item) for item in value[_TUPLE_TAG])
        if len(value) == 1 and _DTYPE_TAG in value:
            dtype = getattr(torch, str(value[_DTYPE_TAG]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown torch dtype {value[_DTYPE_TAG]!r}")
            return dtype
        return {key: _from_json(item) for key, item in value.items()}
    return value


# ----------------------------------------------------------------------------------------------
# Modules rebuilt from their constructor arguments
# ----------------------------------------------------------------------------------------------

# class name in a file -> (class, constructor arguments never read off the module)
_REBUILDABLE: Dict[str, Tuple[type, frozenset]] = {}
_CLASS_NAMES: Dict[type, str] = {}
# Set on sparseq layers after they are built (not constructor arguments, shown by their repr).
_LAYER_ATTRIBUTES = ("format_reason",)


def register_rebuildable(cls: type, name: Optional[str] = None, ignore: Iterable[str] = ()) -> None:
    """Let ``load(path)`` without a skeleton rebuild modules of class ``cls``.

    save() records the module's constructor arguments by reading the attribute of the same name
    (a bool argument whose attribute holds a tensor or None, like ``bias``, records whether it
    holds one; ``dtype`` is the dtype of the module's floating tensors; ``device`` is left out:
    load builds on the meta device). Arguments in ``ignore`` keep their defaults. A class whose
    arguments are not all attributes cannot be registered this way: pass a skeleton to load.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_rebuildable expects an nn.Module subclass, got {cls!r}")
    name = name or f"{cls.__module__}.{cls.__qualname__}"
    _REBUILDABLE[name] = (cls, frozenset(ignore))
    _CLASS_NAMES[cls] = name


for _cls in (nn.Sequential, nn.Identity, nn.Flatten, nn.Unflatten, nn.Linear, nn.Bilinear,
             nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
             nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
             nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU,
             nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softmax,
             nn.LogSoftmax):
    register_rebuildable(_cls, f"torch.nn.{_cls.__name__}")
register_rebuildable(nn.ModuleList, "torch.nn.ModuleList", ignore=("modules",))
register_rebuildable(nn.ModuleDict, "torch.nn.ModuleDict", ignore=("modules",))
register_rebuildable(nn.Embedding, "torch.nn.Embedding", ignore=("_weight", "_freeze"))
register_rebuildable(sparseq_nn.FusedActivation, "sparseq.nn.FusedActivation")
# The sparseq layers: each replaces a dense module of its DENSE_CLASS (weight of dense_shape()).
_SPARSEQ_LAYER_BASES = (FrozenLinearBase, sparseq_nn.QuantizedEmbedding)
for _name in sparseq_nn.__all__:
    _cls = getattr(sparseq_nn, _name)
    if isinstance(_cls, type) and issubclass(_cls, _SPARSEQ_LAYER_BASES):
        register_rebuildable(_cls, f"sparseq.nn.{_name}")


class _NotRebuildable(Exception):
    pass


def _own_tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: t for store in (module._parameters, module._buffers) for name, t in store.items()
            if t is not None}


def _value_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the module's own floating tensors (those not kept in float32 whatever the
    model's dtype), or None if it has none."""
    kept_fp32 = getattr(module, "_FP32_BUFFERS", ())
    for name, tensor in _own_tensors(module).items():
        if name not in kept_fp32 and tensor.is_floating_point():
            return tensor.dtype
    return None


def _constructor_config(module: nn.Module) -> Dict[str, Any]:
    """The constructor arguments that rebuild ``module`` empty, read off its attributes."""
    cls = type(module)
    if cls not in _CLASS_NAMES:
        raise _NotRebuildable(f"{cls.__module__}.{cls.__qualname__} is not a class sparseq can rebuild "
                              "(see sparseq.serialization.register_rebuildable)")
    ignore = _REBUILDABLE[_CLASS_NAMES[cls]][1]
    config: Dict[str, Any] = {}
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    for param in parameters:
        if (param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in ignore
                or param.name == "device"):
            continue
        if param.name == "dtype":
            dtype = _value_dtype(module)
            if dtype is not None:
                config["dtype"] = dtype
            continue
        if param.name in vars(module):
            value = vars(module)[param.name]
        elif param.name in module._parameters or param.name in module._buffers:
            value = _own_tensors(module).get(param.name)  # None when registered as None
        else:
            raise _NotRebuildable(f"{_CLASS_NAMES[cls]} has no attribute {param.name!r} for its "
                                  "constructor argument of that name")
        if isinstance(param.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        if isinstance(value, (torch.Tensor, nn.Module)):
            raise _NotRebuildable(f"{_CLASS_NAMES[cls]}'s constructor argument {param.name!r} is a "
                                  f"{type(value).__name__}")
        config[param.name] = value
    return config


def _build_module(class_name: str, config: Dict[str, Any], path: str) -> nn.Module:
    """An empty module of a registered class, on the meta device (load assigns its tensors)."""
    if class_name not in _REBUILDABLE:
        raise SparseqFileError(path, f"the file names a module class {class_name!r} that this "
                                     "sparseq cannot rebuild")
    cls = _REBUILDABLE[class_name][0]
    try:
        with torch.device("meta"):
            return cls(**config)
    except Exception as exc:  # whatever the constructor raises for arguments it refuses
        raise SparseqFileError(path, f"cannot rebuild a {class_name} from the recorded arguments "
                                     f"{config!r}: {exc}") from None


def _is_sparseq_layer(module: nn.Module) -> bool:
    return isinstance(module, _SPARSEQ_LAYER_BASES) and type(module) in _CLASS_NAMES


def layer_format(layer: nn.Module) -> str:
    """A short description of how a sparseq layer stores its weight, e.g. "csr int8",
    "bsr 4x4 float16", "int8 w8a8 (act_bits=7)"."""
    if isinstance(layer, sparseq_nn.SparseLinear):
        text = layer.format + (f" {layer.block[0]}x{layer.block[1]}" if layer.format == "bsr" else "")
        text += " int8" if layer.int8 else f" {str(_value_dtype(layer)).replace('torch.', '')}"
        act_bits = getattr(layer, "act_bits", None)
        return text + (f" w8a8 (act_bits={act_bits})" if act_bits is not None else "")
    if isinstance(layer, sparseq_nn.Int8StaticLinear):
        return f"int8 w8a8 static (act_bits={layer.act_bits})"
    if isinstance(layer, sparseq_nn.Int8Linear):
        return f"int8 w8a8 (act_bits={layer.act_bits})"
    if isinstance(layer, sparseq_nn.Int8WeightOnlyLinear):
        return "int8 weight-only"
    if isinstance(layer, sparseq_nn.QuantizedEmbedding):
        return f"int{layer.bits} embedding (groups of {layer.group_size})"
    return type(layer).__name__


# ----------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------

def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("sparseq.save / load need the safetensors package: pip install safetensors") from None
    return safetensors


def _sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _all_tensors(model: nn.Module) -> Tuple[Dict[str, Any], List[str]]:
    """The state_dict (tensors and extra states) plus the non-persistent buffers, by name; and
    the names of the latter."""
    state: Dict[str, Any] = dict(model.state_dict())
    non_persistent = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name in sorted(module._non_persistent_buffers_set):
            if module._buffers.get(name) is not None:
                key = _join(prefix, name)
                state[key] = module._buffers[name].detach()
                non_persistent.append(key)
    return state, non_persistent


def _dedupe(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The tensors to store (CPU, contiguous, no two sharing memory, as safetensors requires)
    and the aliases: names whose tensor is exactly (same memory, shape, strides, dtype) one
    stored under an earlier name."""
    stored: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    storages: set = set()
    for key, tensor in tensors.items():
        if tensor.is_meta:
            raise ValueError(f"cannot save {key!r}: it is on the meta device and holds no values")
        if tensor.numel():
            identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                        tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
            if identity in seen:
                aliases[key] = seen[identity]
                continue
            seen[identity] = key
        cpu = tensor.detach().cpu().contiguous()
        storage = (cpu.untyped_storage().data_ptr(), cpu.untyped_storage().nbytes())
        if cpu.numel() and storage in storages:  # partly overlapping views: store a copy
            cpu = cpu.clone()
            storage = (cpu.untyped_storage().data_ptr(), cpu.untyped_storage().nbytes())
        storages.add(storage)
        stored[key] = cpu
    return stored, aliases


def _architecture(model: nn.Module, layers: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    transformers = sys.modules.get("transformers")
    cls = type(model)
    try:
        if transformers is not None and isinstance(model, transformers.PreTrainedModel):
            return _transformers_architecture(model, transformers, layers)
        return {"kind": "torch.nn", "root": _module_tree(model, "", {})}
    except _NotRebuildable as exc:
        reason = str(exc)
    return {"kind": "custom", "class": f"{cls.__module__}.{cls.__qualname__}", "reason": reason}


def _transformers_architecture(model: nn.Module, transformers, layers: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The class name and config that rebuild ``model``, and the edits that turn what
    ``cls(config)`` builds into it (modules left out, e.g. add_pooling_layer=False; layers of
    other shapes, e.g. after structured pruning; changed attributes, e.g. pruned head counts),
    checked here by rebuilding it on the meta device."""
    cls = type(model)
    if getattr(transformers, cls.__name__, None) is not cls:
        raise _NotRebuildable(f"{cls.__module__}.{cls.__qualname__} is not a class of the transformers package")
    architecture = {"kind": "transformers", "class": cls.__name__,
                    "config": json.loads(model.config.to_json_string(use_diff=False)),
                    "attn_implementation": getattr(model.config, "_attn_implementation", None),
                    "transformers_version": transformers.__version__}
    path = "(the model being saved)"
    reference = _build_transformers(architecture, path)
    architecture["edits"] = _edits(model, reference, set(layers))
    try:
        _apply_edits(reference, architecture["edits"], layers, path)
    except SparseqFileError as exc:
        raise _NotRebuildable(exc.problem) from None
    _check_rebuilt(model, reference, set(layers))
    return architecture


def _edits(model: nn.Module, reference: nn.Module, layer_names: set) -> Dict[str, Any]:
    saved = dict(model.named_modules())
    built = dict(reference.named_modules())
    removed = [name for name in built if name and name not in saved and name.rpartition(".")[0] in saved]
    replaced: Dict[str, Any] = {}
    attributes: Dict[str, Any] = {}
    for name, module in saved.items():
        if _is_under(name, replaced) or _is_under(name, layer_names):
            continue
        ref = built.get(name)
        if name in layer_names:  # load puts it in place of the dense module it stands for
            if not (isinstance(ref, module.DENSE_CLASS) and tuple(ref.weight.shape) == module.dense_shape()):
                replaced[name] = {"class": f"torch.nn.{module.DENSE_CLASS.__name__}", "children": [],
                                  "config": _to_json(_dense_config(module), name)}
            continue
        differs = ref is None or type(ref) is not type(module)
        if not differs and type(module) in _CLASS_NAMES:
            differs = _constructor_config(module) != _constructor_config(ref)
        if differs:
            if not name:
                raise _NotRebuildable("the model is not what its class builds from its config")
            try:
                replaced[name] = _module_tree(module, name, {})
            except _NotRebuildable as exc:
                built_there = type(ref).__name__ if ref is not None else "nothing"
                raise _NotRebuildable(f"module {name!r} is a {type(module).__name__} where the model's "
                                      f"class builds {built_there} from its config: {exc}") from None
            continue
        changed = {key: value for key, value in vars(module).items()
                   if not key.startswith("_") and key != "training"
                   and (value is None or isinstance(value, (bool, int, float, str)))
                   and (key not in vars(ref) or type(vars(ref)[key]) is not type(value) or vars(ref)[key] != value)}
        if changed:
            attributes[name] = changed
    return {"removed": removed, "replaced": replaced, "attributes": attributes}


def _check_rebuilt(model: nn.Module, rebuilt: nn.Module, layer_names: set) -> None:
    """Raise _NotRebuildable unless ``rebuilt`` holds the same tensors (names and shapes) as
    ``model`` outside its sparseq layers, and an nn.Linear of the same features where each is."""
    def tensors(m):
        state, _ = _all_tensors(m)
        return {key: tuple(value.shape) for key, value in state.items()
                if isinstance(value, torch.Tensor) and not _is_under(key, layer_names)}

    expected, got = tensors(model), tensors(rebuilt)
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            raise _NotRebuildable(f"rebuilding from the config gives {key!r} the shape {got.get(key)}, "
                                  f"the model has {expected.get(key)}")


def _dense_config(layer: nn.Module) -> Dict[str, Any]:
    """Constructor arguments of the dense module a sparseq layer stands for."""
    if isinstance(layer, sparseq_nn.QuantizedEmbedding):
        return {"num_embeddings": layer.num_embeddings, "embedding_dim": layer.embedding_dim,
                "padding_idx": layer.padding_idx}
    return {"in_features": layer.in_features, "out_features": layer.out_features, "bias": layer.bias is not None}


def _module_tree(module: nn.Module, fqn: str, first_names: Dict[int, str]) -> Dict[str, Any]:
    if id(module) in first_names:
        return {"same_as": first_names[id(module)]}
    first_names[id(module)] = fqn
    if _is_sparseq_layer(module):
        return {"layer": fqn}
    try:
        node = {"class": _CLASS_NAMES.get(type(module), "?"),
                "config": _to_json(_constructor_config(module), "config")}
    except (_NotRebuildable, TypeError) as exc:  # TypeError: an argument JSON cannot hold
        raise _NotRebuildable(f"module {fqn or '(the model)'!r}: {exc}") from None
    node["children"] = [[name, _module_tree(child, _join(fqn, name), first_names)]
                        for name, child in module._modules.items() if child is not None]
    return node


def _layer_records(model: nn.Module, state: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    records: Dict[str, Dict[str, Any]] = {}
    first_names: Dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not _is_sparseq_layer(module):
            continue
        if id(module) in first_names:
            records[name] = {"same_as": first_names[id(module)]}
            continue
        first_names[id(module)] = name
        extra = state.get(_join(name, "_extra_state"))
        records[name] = {
            "class": _CLASS_NAMES[type(module)],
            "config": _to_json(_constructor_config(module), f"{name}'s config"),
            "attributes": {attr: getattr(module, attr) for attr in _LAYER_ATTRIBUTES
                           if isinstance(getattr(module, attr, None), str)},
            "extra_state": _to_json(extra, f"{name}'s extra state"),
            "format": layer_format(module),
            "shape": list(module.dense_shape()),
            "bytes": sum(t.numel() * t.element_size() for t in _own_tensors(module).values()),
        }
    return records


def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def save(model: nn.Module, path: str | os.PathLike, recipe: Any = None) -> None:
    """Write ``model`` to ``path`` as one safetensors file: its tensors as the model holds them
    (packed, sparse, quantized) and JSON metadata (format version, sparseq / torch versions,
    ``recipe``, architecture, per-layer classes, arguments, extra state and formats, checksums).

    recipe: any JSON value (dicts, lists, strings, numbers; tuples and torch dtypes too); by
    default ``model.sparseq_recipe``, the recipe sparseq.compress ran, if the model has one.
    inspect_file shows it, and load sets it as the loaded model's ``sparseq_recipe``.
    The file is written next to ``path`` and renamed over it when complete, so ``path`` never
    holds a half-written file. Nothing is pickled: a module whose extra state is not JSON is
    refused with a ValueError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        example = os.path.join(path, "model.safetensors")
        raise ValueError(f"{path} is a directory; save writes one file (e.g. {example})")
    state, non_persistent = _all_tensors(model)
    records = _layer_records(model, state)
    tensors: Dict[str, torch.Tensor] = {}
    extra_states: Dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif key.endswith("_extra_state"):
            owner = records.get(_owner(key))
            if owner is None:
                try:
                    extra_states[key] = _to_json(value, key)
                except TypeError as exc:
                    raise ValueError(f"cannot save {key}: {exc}") from None
        else:
            raise ValueError(f"cannot save state_dict entry {key!r}: a {type(value).__name__}, not a tensor")
    stored, aliases = _dedupe(tensors)
    if recipe is None:
        recipe = getattr(model, "sparseq_recipe", None)
    try:
        recipe_json = _to_json(recipe, "recipe")
    except TypeError as exc:
        raise ValueError(f"cannot save the recipe: {exc}") from None
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sparseq_version": _SPARSEQ_VERSION,
        "torch_version": torch.__version__,
        "recipe": recipe_json,
        "architecture": _architecture(model, records),
        "training": {"root": model.training,
                     "flipped": [name for name, module in model.named_modules()
                                 if module.training != model.training]},
        "layers": records,
        # Activations folded into the layer before them (sparseq.quant.fuse_gelu_): a skeleton
        # gets the same fusion on load, or its activation would run twice.
        "fused_activations": [name for name, module in model.named_modules()
                              if isinstance(module, sparseq_nn.FusedActivation)],
        "extra_states": extra_states,
        "tensors": {key: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                          "sha256": _sha256(t)} for key, t in stored.items()},
        "aliases": aliases,
        "non_persistent": non_persistent,
    }
    text = json.dumps(document, sort_keys=True)
    metadata = {METADATA_KEY: text, METADATA_CHECKSUM_KEY: hashlib.sha256(text.encode()).hexdigest()}
    _write_atomically(path, lambda tmp: _safetensors().torch.save_file(stored, tmp, metadata=metadata))


def _write_atomically(path: str, write) -> None:
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# reading and verifying a file
# ----------------------------------------------------------------------------------------------

def _read_document(handle, path: str) -> Dict[str, Any]:
    metadata = handle.metadata() or {}
    text = metadata.get(METADATA_KEY)
    if text is None:
        raise SparseqFileError(path, "the file holds no sparseq metadata: it is a safetensors file "
                                     "not written by sparseq.save (read it with safetensors.torch.load_file)")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get(METADATA_CHECKSUM_KEY):
        raise SparseqFileError(path, "the sparseq metadata does not match its checksum: the file is corrupted")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SparseqFileError(path, f"the sparseq metadata is not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise SparseqFileError(path, "the sparseq metadata does not name the sparseq format")
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SparseqFileError(path, f"the sparseq metadata has no valid format version ({version!r})")
    if version > FORMAT_VERSION:
        raise SparseqFileError(path, f"the file has format version {version}, written by sparseq "
                                     f"{document.get('sparseq_version')}; this sparseq {_SPARSEQ_VERSION} "
                                     f"reads versions up to {FORMAT_VERSION}: upgrade sparseq")
    for key, kind in _DOCUMENT_FIELDS.items():
        if not isinstance(document.get(key), kind):
            raise SparseqFileError(path, f"the sparseq metadata's {key!r} is missing or not a {kind.__name__}")
    listed = document["tensors"]
    if set(listed) != set(handle.keys()):
        raise SparseqFileError(path, "the tensors in the file are not the ones its sparseq metadata lists")
    if not set(document["aliases"].values()) <= set(listed):
        raise SparseqFileError(path, "the sparseq metadata has aliases of tensors the file does not hold")
    return document


# What every version-1 document holds (save writes them all), by type.
_DOCUMENT_FIELDS = {"architecture": dict, "training": dict, "layers": dict, "extra_states": dict,
                    "tensors": dict, "aliases": dict, "non_persistent": list}


@contextlib.contextmanager
def _open(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        handle_cm = _safetensors().safe_open(path, framework="pt", device="cpu")
        handle = handle_cm.__enter__()
    except Exception as exc:  # safetensors raises its own SafetensorError (an Exception)
        raise SparseqFileError(path, f"not a readable safetensors file (truncated or corrupted?): {exc}") from None
    try:
        yield handle
    finally:
        handle_cm.__exit__(None, None, None)


def _read_verified(path: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """The metadata document and every tensor of the file (on the CPU), each checked against the
    dtype, shape and SHA-256 the metadata records."""
    with _open(path) as handle:
        document = _read_document(handle, path)
        tensors = {}
        for key, record in document["tensors"].items():
            try:
                tensor = handle.get_tensor(key)
            except Exception as exc:
                raise SparseqFileError(path, f"cannot read tensor {key!r}: {exc}") from None
            if (str(tensor.dtype).replace("torch.", "") != record.get("dtype")
                    or list(tensor.shape) != record.get("shape")):
                raise SparseqFileError(path, f"tensor {key!r} is {tensor.dtype} {tuple(tensor.shape)} but the "
                                             f"metadata records {record.get('dtype')} {record.get('shape')}: "
                                             "the file is corrupted")
            if _sha256(tensor) != record.get("sha256"):
                raise SparseqFileError(path, f"tensor {key!r} does not match its checksum: the file is corrupted")
            tensors[key] = tensor
    return document, tensors


# ----------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _restored_on_error(model: nn.Module):
    """Put back every module's parameters, buffers and children if the block raises (references
    only: nothing is copied)."""
    saved = [(module, dict(module._parameters), dict(module._buffers), dict(module._modules))
             for module in model.modules()]
    try:
        yield
    except BaseException:
        for module, parameters, buffers, children in saved:
            for current, before in ((module._parameters, parameters), (module._buffers, buffers),
                                    (module._modules, children)):
                current.clear()
                current.update(before)
        raise


def _build_layer(record: Dict[str, Any], path: str) -> nn.Module:
    layer = _build_module(record["class"], _from_json(record["config"]), path)
    for attr, value in record.get("attributes", {}).items():
        if attr in _LAYER_ATTRIBUTES:
            setattr(layer, attr, value)
    return layer


def _place_layers(model: nn.Module, records: Dict[str, Dict[str, Any]], path: str) -> None:
    """Put a sparseq layer, built empty from its record, at every name the file has one."""
    built: Dict[str, nn.Module] = {}
    for name, record in records.items():
        if "same_as" in record:
            continue
        if not name:
            raise SparseqFileError(path, f"the file holds a single {record['class']}, which cannot "
                                         "replace the model passed in: call load(path) without a model")
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise SparseqFileError(path, f"the model has no module {name!r}, where the file has a "
                                         f"{record['class']}") from None
        layer = _build_layer(record, path)
        dense = layer.DENSE_CLASS.__name__
        if not (isinstance(target, layer.DENSE_CLASS) or type(target) is type(layer)):
            raise SparseqFileError(path, f"module {name!r} is a {type(target).__name__}; the file's "
                                         f"{record['class']} can only replace an nn.{dense} (or the same class)")
        shape = target.dense_shape() if type(target) is type(layer) else tuple(target.weight.shape)
        if shape != layer.dense_shape():
            raise SparseqFileError(path, f"module {name!r} has an nn.{dense} weight of shape {shape}, the file's "
                                         f"layer stands for {layer.dense_shape()}")
        layer.train(target.training)
        built[name] = layer
    for name, record in records.items():
        layer = built.get(record.get("same_as", name))
        if layer is None:
            raise SparseqFileError(path, f"layer {name!r} is recorded as the same as {record.get('same_as')!r}, "
                                         "which the file does not hold")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def _fuse_activations(model: nn.Module, names: List[str], path: str) -> None:
    """In a skeleton, the exact GELU at each name the file's model had fused becomes a
    FusedActivation, as sparseq.quant.fuse_gelu_ made it."""
    from .quant.quantize import is_exact_gelu

    if not (isinstance(names, list) and all(isinstance(name, str) and name for name in names)):
        raise SparseqFileError(path, "the sparseq metadata's 'fused_activations' is not a list of module names")
    for name in names:
        target = _submodule(model, name, path)
        if isinstance(target, sparseq_nn.FusedActivation):
            continue
        if not is_exact_gelu(target):
            raise SparseqFileError(path, f"the file's layer before {name!r} applies GELU in its kernel, but the "
                                         f"model has a {type(target).__name__} at {name!r}, not a GELU")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, sparseq_nn.FusedActivation("gelu"))


def _state_dict_from_file(document: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    state: Dict[str, Any] = dict(tensors)
    for alias, key in document["aliases"].items():
        state[alias] = tensors[key]
    for name, record in document["layers"].items():
        extra = document["layers"].get(record.get("same_as", name), {}).get("extra_state")
        if extra is not None:
            state[_join(name, "_extra_state")] = _from_json(extra)
    for key, value in document["extra_states"].items():
        state[key] = _from_json(value)
    for key in document["non_persistent"]:
        state.pop(key)
    return state


def _check_layer_dtypes(model: nn.Module, names: Iterable[str], state: Dict[str, Any], path: str) -> None:
    # assign=True takes the file's tensors as they are; a sparseq layer's kernels need the
    # dtypes its recorded arguments build (the per-tensor checksums cannot catch a file written
    # with consistent but wrong metadata).
    for name in names:
        for key, expected in model.get_submodule(name).state_dict().items():
            incoming = state.get(_join(name, key))
            if isinstance(expected, torch.Tensor) and isinstance(incoming, torch.Tensor) \
                    and incoming.dtype != expected.dtype:
                raise SparseqFileError(path, f"tensor {_join(name, key)!r} is {incoming.dtype}; the "
                                             f"layer there needs {expected.dtype}")


def _load_tensors(model: nn.Module, document: Dict[str, Any], tensors: Dict[str, torch.Tensor],
                  path: str) -> None:
    state = _state_dict_from_file(document, tensors)
    _check_layer_dtypes(model, document["layers"], state, path)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise SparseqFileError(path, f"the file's tensors do not fit this model: {exc}") from None
    for key in document["non_persistent"]:
        module, name = _owner_of(model, key, path)
        if name not in module._non_persistent_buffers_set:
            raise SparseqFileError(path, f"the model has no non-persistent buffer {key!r}, which the file holds")
        module._buffers[name] = tensors[document["aliases"].get(key, key)]
    # load_state_dict(assign=True) wraps each name's tensor in its own Parameter: tie them again.
    for alias, key in document["aliases"].items():
        source, name = _owner_of(model, key, path)
        target, alias_name = _owner_of(model, alias, path)
        tensor = source._parameters[name] if name in source._parameters else source._buffers[name]
        if alias_name in target._parameters:
            target._parameters[alias_name] = tensor
        else:
            target._buffers[alias_name] = tensor
    for what, items in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for key, tensor in items:
            if tensor.is_meta:
                raise SparseqFileError(path, f"the file has no values for the model's {what} {key!r}")


def _submodule(model: nn.Module, name: str, path: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SparseqFileError(path, f"the model has no module {name!r}, which the file refers to") from None


def _owner_of(model: nn.Module, key: str, path: str) -> Tuple[nn.Module, str]:
    """The module holding the tensor or submodule named ``key``, and its name in it."""
    owner, _, name = key.rpartition(".")
    return _submodule(model, owner, path), name


def _rebuild(document: Dict[str, Any], path: str) -> nn.Module:
    """The model the file was saved from, built empty on the meta device, sparseq layers in place."""
    architecture = document["architecture"]
    kind = architecture.get("kind")
    if kind == "transformers":
        model = _build_transformers(architecture, path)
        _apply_edits(model, architecture["edits"], document["layers"], path)
        _place_layers(model, document["layers"], path)
    elif kind == "torch.nn":
        model = _rebuild_tree(architecture["root"], "", {}, document["layers"], path)
    else:
        raise ValueError(f"{path} was saved from a {architecture.get('class')}, which sparseq cannot "
                         f"rebuild on its own ({architecture.get('reason')}): pass a skeleton of the "
                         "model, load(path, model=MyModel(...))")
    training = document["training"]
    model.train(training["root"])
    for name in training["flipped"]:
        module = _submodule(model, name, path)
        module.training = not training["root"]
    return model


def _build_transformers(architecture: Dict[str, Any], path: str) -> nn.Module:
    """``cls(config)`` of the recorded transformers class, on the meta device."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{path} holds a transformers {architecture['class']}: install transformers "
                          "to load it") from None
    cls = getattr(transformers, architecture["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SparseqFileError(path, f"transformers {transformers.__version__} has no model class "
                                     f"{architecture['class']!r}")
    kwargs = {}
    if architecture.get("attn_implementation"):
        kwargs["attn_implementation"] = architecture["attn_implementation"]
    config = cls.config_class.from_dict(architecture["config"], **kwargs)
    with torch.device("meta"):
        return cls(config)


def _apply_edits(model: nn.Module, edits: Dict[str, Any], layers: Dict[str, Dict[str, Any]],
                 path: str) -> None:
    """Turn what the class builds from its config into the saved model (see _edits)."""
    for name in edits["removed"]:
        owner, child = _owner_of(model, name, path)
        setattr(owner, child, None)
    for name, node in edits["replaced"].items():
        owner, child = _owner_of(model, name, path)
        setattr(owner, child, _rebuild_tree(node, name, {}, layers, path))
    for name, changed in edits["attributes"].items():
        module = _submodule(model, name, path)
        for key, value in changed.items():
            setattr(module, key, value)


def _rebuild_tree(node: Dict[str, Any], fqn: str, built: Dict[str, nn.Module],
                  layers: Dict[str, Dict[str, Any]], path: str) -> nn.Module:
    if "same_as" in node:
        module = built.get(node["same_as"])
        if module is None:
            raise SparseqFileError(path, f"module {fqn!r} is recorded as the same as {node['same_as']!r}, "
                                         "which comes later or not at all")
        return module
    if "layer" in node:
        if fqn not in layers:
            raise SparseqFileError(path, f"the module tree has a sparseq layer at {fqn!r} but no record of it")
        module = _build_layer(layers[fqn], path)
    else:
        module = _build_module(node["class"], _from_json(node["config"]), path)
        for name, child in node["children"]:
            module.add_module(name, _rebuild_tree(child, _join(fqn, name), built, layers, path))
    built[fqn] = module
    return module


def load(path: str | os.PathLike, model: Optional[nn.Module] = None,
         device: Optional[torch.device | str] = None) -> nn.Module:
    """Load a file written by save().

    model=None: rebuild the model the file was saved from (a transformers model from its class
    and config, or a tree of torch.nn / sparseq modules), on the meta device, then load its
    tensors, so no dense weight is ever materialised; a model of any other class needs a
    skeleton. model=a skeleton (the dense architecture, freshly built): every sparseq layer in
    the file replaces the nn.Linear at its name, built empty from its recorded arguments, then
    every tensor is loaded strictly (the skeleton's own tensors are replaced, not copied into, so
    dtypes are the file's; a skeleton on the meta device works); the skeleton is modified in
    place and returned, or left as it was if anything fails.
    device: where the tensors go (default: the skeleton's device, else the CPU).
    A recipe saved with the model is set as its ``sparseq_recipe``.

    Raises SparseqFileError (a ValueError) naming the file and the problem for a truncated or
    corrupted file, one without sparseq metadata, a newer format version, or a file that does
    not fit the skeleton (missing / unexpected keys, shapes, layer classes).
    """
    path = os.fspath(path)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"load's model must be an nn.Module skeleton (or None), got {type(model).__name__}")
    document, tensors = _read_verified(path)
    if device is None:
        device = model_device(model) if model is not None else torch.device("cpu")
        if device.type == "meta":
            device = torch.device("cpu")
    tensors = {key: tensor.to(device) for key, tensor in tensors.items()}
    if model is None:
        model = _rebuild(document, path)
        _load_tensors(model, document, tensors, path)
    else:
        with _restored_on_error(model):
            _place_layers(model, document["layers"], path)
            _fuse_activations(model, document.get("fused_activations", []), path)
            _load_tensors(model, document, tensors, path)
    if document["recipe"] is not None:
        model.sparseq_recipe = _from_json(document["recipe"])
    return model


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------

def inspect_file(path: str | os.PathLike, verify: bool = False) -> Dict[str, Any]:
    """What a sparseq file holds, read from its header only (verify=True also reads every tensor
    and checks its checksum).

    Returns {"path", "file_bytes", "format", "format_version", "sparseq_version",
    "torch_version", "recipe", "architecture" ({"kind": "transformers" | "torch.nn" | "custom",
    "class"}), "layers" (a list of {"name", "class", "format", "shape" [out, in], "bytes"};
    "same_as" for a layer shared with another name), "tensor_count", "alias_count",
    "layer_bytes", "other_bytes", "total_bytes" (tensor bytes stored), "verified"}.
    """
    path = os.fspath(path)
    if verify:
        document, _ = _read_verified(path)
    else:
        with _open(path) as handle:
            document = _read_document(handle, path)
    architecture = document.get("architecture", {})
    if architecture.get("kind") == "torch.nn":
        arch_class = architecture["root"].get("class") or document["layers"][""]["class"]
    else:
        arch_class = architecture.get("class")
    layers = []
    for name, record in document.get("layers", {}).items():
        if "same_as" in record:
            layers.append({"name": name, "same_as": record["same_as"]})
        else:
            layers.append({"name": name, "class": record["class"].rpartition(".")[2],
                           "format": record["format"], "shape": record["shape"], "bytes": record["bytes"]})
    total = sum(_tensor_bytes(record) for record in document["tensors"].values())
    layer_bytes = sum(layer.get("bytes", 0) for layer in layers)
    return {"path": path, "file_bytes": os.path.getsize(path), "format": document["format"],
            "format_version": document["format_version"], "sparseq_version": document.get("sparseq_version"),
            "torch_version": document.get("torch_version"), "recipe": _from_json(document.get("recipe")),
            "architecture": {"kind": architecture.get("kind"), "class": arch_class},
            "layers": layers, "tensor_count": len(document["tensors"]),
            "alias_count": len(document.get("aliases", {})), "layer_bytes": layer_bytes,
            "other_bytes": total - layer_bytes, "total_bytes": total, "verified": verify}


def _tensor_bytes(record: Dict[str, Any]) -> int:
    count = 1
    for size in record["shape"]:
        count *= size
    return count * torch.empty(0, dtype=getattr(torch, record["dtype"])).element_size()


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def format_inspection(info: Dict[str, Any]) -> str:
    """inspect_file's result as the text `sparseq inspect PATH` prints: a summary, then one row
    per sparseq layer (name, class, format, shape, bytes)."""
    arch = info["architecture"]
    lines = [
        f"file:          {info['path']} ({_human_bytes(info['file_bytes'])})",
        f"format:        {info['format']} v{info['format_version']} (sparseq {info['sparseq_version']}, "
        f"torch {info['torch_version']})" + ("  checksums verified" if info.get("verified") else ""),
        f"architecture:  {arch['kind']}" + (f" {arch['class']}" if arch.get("class") else ""),
        f"recipe:        {json.dumps(info['recipe']) if info['recipe'] is not None else '(none)'}",
        f"tensors:       {info['tensor_count']} stored, {info['alias_count']} aliases (tied)",
    ]
    rows = [("layer", "class", "format", "shape", "bytes")]
    for layer in info["layers"]:
        if "same_as" in layer:
            rows.append((layer["name"], "", f"same as {layer['same_as']}", "", ""))
        else:
            rows.append((layer["name"], layer["class"], layer["format"],
                         "x".join(str(s) for s in layer["shape"]), _human_bytes(layer["bytes"])))
    rows.append(("(other tensors)", "", "", "", _human_bytes(info["other_bytes"])))
    rows.append(("total", "", "", "", _human_bytes(info["total_bytes"])))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines.append("")
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) if i == 4 else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if index == 0 or index == len(rows) - 3:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
