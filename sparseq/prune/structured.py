"""Structured pruning: remove whole neurons, channels and attention heads, and shrink the layers.

Unstructured and N:M pruning leave the shapes alone and need sparse kernels to pay off; this pass
removes whole units instead, so the result is a smaller *dense* model that ordinary kernels run
faster. Removing a unit touches every layer that reads or writes it, so the pass first finds the
groups of coupled slices (a "dependency group"), scores the units of each group, and then rebuilds
every touched layer at its new width in one go.

How the groups are found:

* Plain ``nn.Module`` models are traced with ``torch.fx`` and the example inputs are propagated
  through the graph for shapes. From the output of every ``nn.Linear`` / ``nn.ConvNd`` the pass
  follows the tensor through channel-wise operations (activations, dropout, arithmetic with a
  number, ``BatchNorm``, pooling, flatten) to the layers that read it (``nn.Linear`` input columns,
  ``nn.ConvNd`` input channels). Anything else on the way -- an addition of two tensors (a
  residual stream), a concatenation, a ``LayerNorm``, the model's output, a module called twice --
  makes the group unprunable; it is left alone and the reason is listed in the report. Residual
  streams are therefore never pruned: every channel of a stream feeds the same additions, and
  pruning them correctly means pruning the whole stream (every block's output, the stem and the
  head) together, which this pass deliberately does not attempt.
* ``transformers`` models are recognised by the structure of their blocks (``torch.fx`` is
  brittle there): a BERT-style feed-forward (``intermediate.dense`` -> act -> ``output.dense``)
  and BERT-style self-attention (``self.query/key/value`` + ``output.dense``), a LLaMA-style MLP
  (``gate_proj``/``up_proj`` -> ``down_proj``) and LLaMA-style attention (``q/k/v/o_proj`` with
  ``head_dim``). Each recognised block is checked on the example inputs with hooks (the tensor
  the second layer reads is the one the first produced, through the block's activation) before it
  is pruned; a block that fails the check or did not run is left alone. Only these blocks are
  pruned in such a model: embeddings, the hidden size (a residual stream) and heads are untouched.
  The model's ``config`` is not changed (per-layer widths live in the layers).
* Attention heads with grouped-query attention (LLaMA ``num_key_value_heads < num_attention_heads``)
  are pruned by whole key/value groups: a unit is one K/V head with the query heads that share
  it, so every remaining group stays the same size and ``num_key_value_groups`` is unchanged.
  (Pruning query heads inside groups would leave groups of different sizes, which the attention
  code's ``repeat_kv`` cannot express.) With plain multi-head attention a unit is one head.

A model the pass cannot analyse (``torch.fx`` cannot trace it and no ``transformers`` block is
recognised) gets a ValueError naming the module where tracing failed; it is never pruned blindly.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..calib import eval_mode, input_hooks, main_output, run_batches, token_rows
from ..convert import name_matches, swap_modules

__all__ = ["structured", "StructuredReport", "GroupReport", "GROUP_KINDS"]

# "linear": Linear -> Linear chains, "conv": ConvNd (-> BatchNorm) -> ConvNd/Linear chains,
# "ffn": transformer feed-forward width, "heads": attention heads.
GROUP_KINDS = ("linear", "conv", "ffn", "heads")

Importance = Union[str, Callable[[str, List[torch.Tensor]], torch.Tensor]]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules and functions that act on each element (or each channel) on its own, so a channel that
# goes in comes out at the same place and nothing else depends on it.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Identity)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.selu,
    F.celu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.softplus, F.softsign, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.relu, torch.sigmoid, torch.tanh,
    torch.exp, torch.abs, torch.square, torch.sqrt, torch.clamp, torch.neg,
    operator.neg, operator.pos, operator.abs}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "square", "sqrt",
    "clamp", "clamp_", "neg", "contiguous", "clone", "detach", "float", "half", "bfloat16", "to",
    "type_as"}
# Arithmetic with a plain number is elementwise; with another tensor it ties channels together.
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
               operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
               torch.div}
_ARITHMETIC_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                   F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                   F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                   F.adaptive_max_pool3d}
_RESHAPES_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPES_METHODS = {"flatten", "view", "reshape"}
# Users of a tensor that read its metadata, not its values.
_METADATA_METHODS = {"size", "dim", "numel"}


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class GroupReport:
    """One dependency group: its units before and after, which ones were kept, the layers it
    shrank."""
    name: str
    kind: str  # one of GROUP_KINDS
    unit: str  # what one unit is: "neuron", "channel", "head", "kv-group"
    units_before: int
    units_after: int
    kept: List[int]  # indices (into the units before pruning) of the units kept, ascending
    modules: List[str]  # every module whose shape changes (producers, norms, consumers)


@dataclass
class StructuredReport:
    """What ``structured`` removed: one GroupReport per pruned group, the groups it could not prune
    (name -> reason), and the model's parameter count before and after."""
    groups: List[GroupReport]
    skipped: Dict[str, str]
    params_before: int
    params_after: int

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def table(self) -> str:
        """The report as a fixed-width text table."""
        rows = [("group", "kind", "unit", "before", "after")]
        rows += [(g.name, g.kind, g.unit, str(g.units_before), str(g.units_after))
                 for g in self.groups]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.append(f"parameters: {self.params_before:,} -> {self.params_after:,} "
                     f"({self.params_after / max(self.params_before, 1):.1%} kept)")
        if self.skipped:
            lines.append("left alone:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------
# Dependency groups


@dataclass
class _Member:
    """A slice of one module that belongs to a group: along ``dim`` (0: outputs -- weight rows /
    out-channels, bias, norm entries; 1: inputs -- weight columns / in-channels), unit u owns the
    indices [u * width, (u + 1) * width)."""
    name: str
    dim: int
    width: int = 1


@dataclass
class _Group:
    name: str
    kind: str
    unit: str
    num_units: int
    members: List[_Member]
    # Given the kept unit indices, the (object, attribute, new value) updates the block needs
    # besides its layers' shapes (head counts of an attention module, ...).
    attribute_updates: Callable[[torch.Tensor], List[Tuple[Any, str, Any]]] = lambda kept: []


class _Barrier(Exception):
    """The tensor followed from a producer reaches something that is not channel-wise."""


def _only_once(model: nn.Module) -> Dict[str, nn.Module]:
    """name -> module for modules reachable under exactly one name (a shared module's slices would
    have to agree between its users, so shared modules are never pruned)."""
    counts: Dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    return {name: module for name, module in model.named_modules()
            if counts[id(module)] == 1}


class _NamingTracer(torch.fx.Tracer):
    """An fx tracer that remembers in which submodule tracing failed, for the error message."""

    def __init__(self):
        super().__init__()
        self.failed_in: Optional[str] = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or type(m).__name__
            raise


def _placeholder_args(graph_module: torch.fx.GraphModule, batch: Any) -> List[Any]:
    """The example batch as positional arguments of the traced graph's placeholders."""
    placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return list(batch)
    args = []
    for node in placeholders:
        if node.target in batch:
            args.append(batch[node.target])
        elif node.args:
            args.append(node.args[0])
        else:
            raise ValueError(f"example_inputs has no value for the model's argument {node.target!r}")
    return args


def _trace_graph(model: nn.Module, example_inputs: Any) -> torch.fx.GraphModule:
    tracer = _NamingTracer()
    try:
        with eval_mode(model):
            graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.failed_in or type(model).__name__
        raise ValueError(
            f"structured: cannot analyse {type(model).__name__}: torch.fx could not trace module "
            f"{where!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}), "
            f"and it holds no recognised transformers block (BERT- or LLaMA-style). Pass a "
            f"traceable model, or prune its parts separately") from exc
    graph_module = torch.fx.GraphModule(model, graph)
    try:
        with eval_mode(model), torch.no_grad():
            ShapeProp(graph_module).propagate(*_placeholder_args(graph_module, example_inputs))
    except Exception as exc:
        raise ValueError(f"structured: the traced {type(model).__name__} could not run "
                         f"example_inputs ({type(exc).__name__}: {exc})") from exc
    return graph_module


def _shape(node: torch.fx.Node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def _follow(node: torch.fx.Node, channel_dim: int, width: int, modules: Dict[str, nn.Module],
            calls: Dict[str, int], members: List[_Member]) -> None:
    """Follow the tensor of ``node`` (channels along ``channel_dim``, ``width`` consecutive
    entries per unit) to every layer that reads it, appending their slices to ``members``;
    raise _Barrier naming the first thing on the way that is not channel-wise."""
    shape = _shape(node)
    ndim = len(shape) if shape is not None else None
    channel_last = ndim is not None and channel_dim == ndim - 1
    for user in node.users:
        if user.op == "output":
            raise _Barrier("feeds the model's output")
        if user.op == "call_module":
            module = modules.get(user.target)
            if module is None:
                raise _Barrier(f"feeds {user.target}, a module reachable under several names")
            if calls[user.target] != 1:
                raise _Barrier(f"feeds {user.target}, which is called more than once")
            if user.args[0] is not node or len(user.args) + len(user.kwargs) != 1:
                raise _Barrier(f"feeds {user.target} in an unexpected argument")
            if type(module) is nn.Linear:
                if not channel_last:
                    raise _Barrier(f"reaches Linear {user.target} along a dimension other than "
                                   f"the last")
                members.append(_Member(user.target, 1, width))
            elif type(module) in _CONVS and module.groups == 1 and channel_dim == 1 and width == 1:
                members.append(_Member(user.target, 1, 1))
            elif type(module) in _NORMS and channel_dim == 1 and width == 1:
                members.append(_Member(user.target, 0, 1))
                _follow(user, channel_dim, width, modules, calls, members)
            elif isinstance(module, _ELEMENTWISE_MODULES):
                _follow(user, channel_dim, width, modules, calls, members)
            elif isinstance(module, _POOL_MODULES) and channel_dim == 1 and ndim and ndim >= 3:
                _follow(user, channel_dim, width, modules, calls, members)
            elif isinstance(module, nn.Flatten):
                _follow_reshape(node, user, channel_dim, width, modules, calls, members)
            else:
                raise _Barrier(f"feeds {user.target} ({type(module).__name__}), which is not "
                               f"channel-wise")
            continue
        if user.op in ("call_function", "call_method"):
            target = user.target
            others = [arg for arg in list(user.args) + list(user.kwargs.values()) if arg is not node]
            if user.op == "call_method" and target in _METADATA_METHODS:
                continue
            if target is getattr and user.args[1] in ("shape", "dtype", "device", "ndim"):
                continue
            elementwise = (target in _ELEMENTWISE_FUNCTIONS if user.op == "call_function"
                           else target in _ELEMENTWISE_METHODS)
            if elementwise and not any(isinstance(arg, torch.fx.Node) for arg in others):
                _follow(user, channel_dim, width, modules, calls, members)
                continue
            arithmetic = (target in _ARITHMETIC if user.op == "call_function"
                          else target in _ARITHMETIC_METHODS)
            if arithmetic:
                if not any(isinstance(arg, torch.fx.Node) for arg in others):
                    _follow(user, channel_dim, width, modules, calls, members)
                    continue
                raise _Barrier(f"feeds {user.name} together with another tensor: a residual "
                               f"addition or a gate ties its channels to others")
            if user.op == "call_function" and target in _POOL_FUNCTIONS and channel_dim == 1 \
                    and ndim and ndim >= 3:
                _follow(user, channel_dim, width, modules, calls, members)
                continue
            if (target in _RESHAPES_FUNCTIONS if user.op == "call_function"
                    else target in _RESHAPES_METHODS):
                _follow_reshape(node, user, channel_dim, width, modules, calls, members)
                continue
            raise _Barrier(f"feeds {user.name} ({getattr(target, '__name__', target)}), which is "
                           f"not channel-wise")
        raise _Barrier(f"feeds {user.name} ({user.op})")


def _follow_reshape(node, user, channel_dim, width, modules, calls, members) -> None:
    """A reshape keeps the units in place if it flattens (N, C, *S) to (N, C * prod(S)) -- each
    channel becomes prod(S) consecutive features -- or leaves a last channel dimension alone."""
    before, after = _shape(node), _shape(user)
    if before is None or after is None:
        raise _Barrier(f"feeds {user.name}, a reshape of unknown shape")
    if channel_dim == len(before) - 1 and len(after) >= 1 and after[-1] == before[-1]:
        _follow(user, len(after) - 1, width, modules, calls, members)
        return
    spatial = math.prod(before[2:])
    if channel_dim == 1 and tuple(after) == (before[0], before[1] * spatial):
        _follow(user, 1, width * spatial, modules, calls, members)
        return
    raise _Barrier(f"feeds {user.name}, a reshape {tuple(before)} -> {tuple(after)} that moves "
                   f"channels")


def _fx_groups(model: nn.Module, example_inputs: Any) -> Tuple[List[_Group], Dict[str, str]]:
    graph_module = _trace_graph(model, example_inputs)
    modules = _only_once(model)
    calls: Dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    groups, skipped = [], {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules.get(node.target)
        if type(module) is nn.Linear:
            shape = _shape(node)
            if shape is None:
                continue
            kind, unit, units, channel_dim = "linear", "neuron", module.out_features, len(shape) - 1
        elif type(module) in _CONVS:
            if module.groups != 1:
                skipped[node.target] = "grouped convolution"
                continue
            kind, unit, units, channel_dim = "conv", "channel", module.out_channels, 1
        else:
            continue
        if calls[node.target] != 1:
            skipped[node.target] = "called more than once"
            continue
        members = [_Member(node.target, 0, 1)]
        try:
            _follow(node, channel_dim, 1, modules, calls, members)
        except _Barrier as barrier:
            skipped[node.target] = str(barrier)
            continue
        if len(members) == 1:
            skipped[node.target] = "its output is not read by any layer"
            continue
        groups.append(_Group(node.target, kind, unit, units, members))
    return groups, skipped


# --------------------------------------------------------------------------------------------
# transformers blocks


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _linears(module: nn.Module, *names: str) -> Optional[List[nn.Linear]]:
    found = [getattr(module, name, None) for name in names]
    return found if all(type(layer) is nn.Linear for layer in found) else None


class _Recorder:
    """Forward hooks keeping the first input and the output of chosen modules on one run."""

    def __init__(self):
        self.inputs: Dict[int, torch.Tensor] = {}
        self.outputs: Dict[int, Any] = {}
        self.handles = []

    def watch(self, *modules: nn.Module) -> None:
        for module in modules:
            def hook(mod, args, output):
                if args and isinstance(args[0], torch.Tensor):
                    self.inputs[id(mod)] = args[0]
                self.outputs[id(mod)] = output
            self.handles.append(module.register_forward_hook(hook))

    def ran(self, *modules: nn.Module) -> bool:
        return all(id(module) in self.outputs for module in modules)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (
        a is b or (a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)))


def _bert_ffn(name: str, layer: nn.Module):
    intermediate, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    dense_in = _linears(intermediate, "dense") if intermediate is not None else None
    dense_out = _linears(output, "dense") if output is not None else None
    if not dense_in or not dense_out or dense_in[0].out_features != dense_out[0].in_features:
        return None
    first, second = dense_in[0], dense_out[0]
    activation = getattr(intermediate, "intermediate_act_fn", None)

    def verify(rec: _Recorder) -> Optional[str]:
        if not rec.ran(intermediate, first, second):
            return "did not run on example_inputs"
        if sum(p.numel() for p in intermediate.parameters()) != \
                sum(p.numel() for p in first.parameters()):
            return "intermediate holds more than its dense layer and activation"
        if not _same(rec.inputs[id(second)], rec.outputs[id(intermediate)]):
            return "output.dense does not read the intermediate output"
        if activation is None or not _same(rec.outputs[id(intermediate)],
                                           activation(rec.outputs[id(first)])):
            return "intermediate output is not its activation of intermediate.dense"
        return None

    group = _Group(f"{name}.intermediate", "ffn", "neuron", first.out_features,
                   [_Member(f"{name}.intermediate.dense", 0), _Member(f"{name}.output.dense", 1)])
    return group, (intermediate, first, second), verify


def _llama_mlp(name: str, mlp: nn.Module):
    layers = _linears(mlp, "gate_proj", "up_proj", "down_proj")
    if not layers or layers[0].out_features != layers[2].in_features \
            or layers[1].out_features != layers[2].in_features:
        return None
    gate, up, down = layers
    activation = getattr(mlp, "act_fn", None)

    def verify(rec: _Recorder) -> Optional[str]:
        if not rec.ran(gate, up, down):
            return "did not run on example_inputs"
        if activation is None or not _same(
                rec.inputs[id(down)], activation(rec.outputs[id(gate)]) * rec.outputs[id(up)]):
            return "down_proj does not read act_fn(gate_proj(x)) * up_proj(x)"
        return None

    def updates(kept: torch.Tensor):
        return [(mlp, "intermediate_size", len(kept))] if hasattr(mlp, "intermediate_size") else []

    group = _Group(name, "ffn", "neuron", gate.out_features,
                   [_Member(f"{name}.gate_proj", 0), _Member(f"{name}.up_proj", 0),
                    _Member(f"{name}.down_proj", 1)], updates)
    return group, (gate, up, down), verify


def _bert_heads(name: str, attention: nn.Module):
    self_attention, output = getattr(attention, "self", None), getattr(attention, "output", None)
    qkv = _linears(self_attention, "query", "key", "value") if self_attention is not None else None
    dense = _linears(output, "dense") if output is not None else None
    head_size = getattr(self_attention, "attention_head_size", None)
    heads = getattr(self_attention, "num_attention_heads", None)
    if not qkv or not dense or not isinstance(head_size, int) or not isinstance(heads, int):
        return None
    width = heads * head_size
    if any(layer.out_features != width for layer in qkv) or dense[0].in_features != width:
        return None

    def verify(rec: _Recorder) -> Optional[str]:
        if not rec.ran(self_attention, dense[0]):
            return "did not run on example_inputs"
        context = rec.outputs[id(self_attention)]
        context = context[0] if isinstance(context, (tuple, list)) else context
        if not _same(rec.inputs[id(dense[0])], context):
            return "output.dense does not read the self-attention output"
        return None

    def updates(kept: torch.Tensor):
        changes = [(self_attention, "num_attention_heads", len(kept)),
                   (self_attention, "all_head_size", len(kept) * head_size)]
        pruned = getattr(attention, "pruned_heads", None)
        if isinstance(pruned, set):  # transformers 4.x keeps original head ids for prune_heads()
            original = [h for h in range(heads + len(pruned)) if h not in pruned]
            removed = {original[h] for h in range(heads) if h not in set(kept.tolist())}
            changes.append((attention, "pruned_heads", pruned | removed))
        return changes

    members = [_Member(f"{name}.self.{proj}", 0, head_size) for proj in ("query", "key", "value")]
    members.append(_Member(f"{name}.output.dense", 1, head_size))
    group = _Group(name, "heads", "head", heads, members, updates)
    return group, (self_attention, dense[0]), verify


def _llama_heads(name: str, attention: nn.Module):
    layers = _linears(attention, "q_proj", "k_proj", "v_proj", "o_proj")
    head_dim = getattr(attention, "head_dim", None)
    if not layers or not isinstance(head_dim, int) or head_dim <= 0:
        return None
    q, k, v, o = layers
    if q.out_features % head_dim or k.out_features % head_dim or k.out_features != v.out_features \
            or o.in_features != q.out_features:
        return None
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if heads % kv_heads or getattr(attention, "num_key_value_groups", heads // kv_heads) \
            != heads // kv_heads:
        return None
    group_size = heads // kv_heads
    hidden = getattr(attention, "hidden_size", None)

    def verify(rec: _Recorder) -> Optional[str]:
        if not rec.ran(q, k, v, o):
            return "did not run on example_inputs"
        if rec.inputs[id(o)].shape[-1] != q.out_features:
            return "o_proj does not read the attention output"
        return None

    def updates(kept: torch.Tensor):
        # transformers 4.x attention modules kept the counts as attributes; 5.x infers them.
        changes = []
        if hasattr(attention, "num_heads"):
            changes.append((attention, "num_heads", len(kept) * group_size))
        if hasattr(attention, "num_key_value_heads"):
            changes.append((attention, "num_key_value_heads", len(kept)))
        if hidden == q.out_features:
            changes.append((attention, "hidden_size", len(kept) * group_size * head_dim))
        return changes

    members = [_Member(f"{name}.q_proj", 0, group_size * head_dim),
               _Member(f"{name}.k_proj", 0, head_dim), _Member(f"{name}.v_proj", 0, head_dim),
               _Member(f"{name}.o_proj", 1, group_size * head_dim)]
    unit = "head" if group_size == 1 else "kv-group"
    return _Group(name, "heads", unit, kv_heads, members, updates), (q, k, v, o), verify


_BLOCK_RECOGNISERS = (_bert_ffn, _llama_mlp, _bert_heads, _llama_heads)


def _transformer_blocks(model: nn.Module):
    """(group, modules to watch, verify) for every recognised transformers block."""
    shared = _only_once(model)
    blocks = []
    for name, module in model.named_modules():
        if not _from_transformers(module) or name not in shared:
            continue
        for recognise in _BLOCK_RECOGNISERS:
            found = recognise(name, module)
            if found is not None:
                blocks.append(found)
    return blocks


# --------------------------------------------------------------------------------------------
# Scoring and rebuilding


def _unit_weights(group: _Group, modules: Dict[str, nn.Module]) -> List[torch.Tensor]:
    """Each weight matrix/kernel of the group with its units along dim 0: (units, -1)."""
    tensors = []
    for member in group.members:
        module = modules[member.name]
        if type(module) in _NORMS:
            continue
        weight = module.weight.detach()
        tensors.append(weight.movedim(member.dim, 0).reshape(group.num_units, -1))
    return tensors


def _input_energy(model: nn.Module, groups: List[_Group], modules: Dict[str, nn.Module],
                  calib_data: Iterable[Any]) -> Dict[str, torch.Tensor]:
    """For each layer that reads a group's units: the sum over the calibration data of x_j ** 2
    for every input feature / channel j."""
    consumers = {member.name: modules[member.name] for group in groups
                 for member in group.members if member.dim == 1}
    energy: Dict[str, torch.Tensor] = {}

    def accumulate(name: str, module: nn.Module, x: torch.Tensor) -> None:
        x = x.detach().float()
        if type(module) is nn.Linear:
            total = token_rows(x).pow(2).sum(0)
        else:
            channels = x.movedim(1, 0)
            total = channels.pow(2).reshape(channels.shape[0], -1).sum(1)
        energy[name] = energy[name] + total if name in energy else total

    with input_hooks(consumers, accumulate):
        run_batches(model, calib_data, what="calib_data")
    missing = sorted(set(consumers) - set(energy))
    if missing:
        raise ValueError(f"structured: calib_data never reached {', '.join(missing)}, so their "
                         f"inputs cannot be scored")
    return energy


def _activation_scores(group: _Group, modules: Dict[str, nn.Module],
                       energy: Dict[str, torch.Tensor]) -> torch.Tensor:
    """sqrt(sum over the unit's input features j of every reading layer of ||W[:, j]||^2 *
    sum x_j^2): the energy the unit sends into the next layers (Wanda's |W| * ||x||, summed)."""
    total = torch.zeros(group.num_units)
    for member in group.members:
        if member.dim != 1:
            continue
        weight = modules[member.name].weight.detach().float()
        column_energy = weight.pow(2).movedim(1, 0).reshape(weight.shape[1], -1).sum(1)
        contribution = column_energy * energy[member.name].to(column_energy.device)
        total += contribution.reshape(group.num_units, -1).sum(1).cpu()
    return total.sqrt()


def _scores(group: _Group, modules: Dict[str, nn.Module], importance: Importance,
            energy: Optional[Dict[str, torch.Tensor]]) -> torch.Tensor:
    if importance == "activation":
        return _activation_scores(group, modules, energy)
    unit_weights = _unit_weights(group, modules)
    if importance == "l2":
        return torch.stack([w.float().pow(2).sum(1) for w in unit_weights]).sum(0).sqrt()
    if importance == "l1":
        return torch.stack([w.float().abs().sum(1) for w in unit_weights]).sum(0)
    scores = importance(group.name, unit_weights)
    if not isinstance(scores, torch.Tensor) or scores.shape != (group.num_units,):
        raise ValueError(f"structured: importance({group.name!r}, ...) must return a tensor of "
                         f"shape ({group.num_units},), one score per unit; got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    return scores.detach().float()


def _units_kept(units: int, ratio: float, round_to: int) -> int:
    """units - floor(ratio * units), at least 1, then rounded up to a multiple of round_to (never
    above units): rounding keeps more, never removes more than ratio asks."""
    keep = max(1, units - math.floor(ratio * units + 1e-9))
    return min(units, math.ceil(keep / round_to) * round_to)


def _member_index(member: _Member, kept: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(member.width)
    return (kept[:, None] * member.width + offsets).reshape(-1)


def _rebuilt(module: nn.Module, index: Dict[int, torch.Tensor]) -> nn.Module:
    """A fresh module of the same type with only the indexed outputs (dim 0) / inputs (dim 1)."""
    # A BatchNorm without affine parameters still has its running statistics.
    like = module.weight if module.weight is not None else next(iter(module.buffers()))
    factory = dict(device=like.device, dtype=like.dtype)
    out_index, in_index = index.get(0), index.get(1)
    if type(module) is nn.Linear:
        new = torch.nn.utils.skip_init(
            nn.Linear, module.in_features if in_index is None else len(in_index),
            module.out_features if out_index is None else len(out_index),
            bias=module.bias is not None, **factory)
    elif type(module) in _CONVS:
        new = torch.nn.utils.skip_init(
            type(module), module.in_channels if in_index is None else len(in_index),
            module.out_channels if out_index is None else len(out_index), module.kernel_size,
            stride=module.stride, padding=module.padding, dilation=module.dilation, groups=1,
            bias=module.bias is not None, padding_mode=module.padding_mode, **factory)
    else:  # BatchNorm: dim 0 only
        new = type(module)(len(out_index), eps=module.eps, momentum=module.momentum,
                           affine=module.affine, track_running_stats=module.track_running_stats,
                           **factory)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters(recurse=False)) + \
                list(module.named_buffers(recurse=False)):
            sliced = tensor
            if out_index is not None and sliced.dim() >= 1 and name != "num_batches_tracked":
                sliced = sliced.index_select(0, out_index.to(sliced.device))
            if in_index is not None and name == "weight" and sliced.dim() >= 2:
                sliced = sliced.index_select(1, in_index.to(sliced.device))
            target = getattr(new, name)
            if target is None:
                continue
            target.copy_(sliced)
            if isinstance(tensor, nn.Parameter):
                target.requires_grad_(tensor.requires_grad)
    new.train(module.training)
    return new


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run_and_shape(model: nn.Module, example_inputs: Any, watch: Sequence[nn.Module] = ()):
    """Run the one example batch (the batch convention of sparseq.calib); return the main output
    tensor and a _Recorder of the watched modules' inputs and outputs."""
    recorder = _Recorder()
    recorder.watch(*watch)
    captured = {}
    handle = model.register_forward_hook(lambda mod, args, out: captured.setdefault("out", out))
    try:
        run_batches(model, [example_inputs], what="example_inputs")
    finally:
        handle.remove()
        recorder.remove()
    return main_output(captured["out"]), recorder


def _check_arguments(model, ratio, importance, targets, round_to, calib_data) -> Tuple[str, ...]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"structured: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"structured: ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"structured: ratio must be in [0, 1) (the fraction of units removed "
                         f"per group), got {ratio}")
    if not callable(importance) and importance not in ("l1", "l2", "activation"):
        raise ValueError(f"structured: importance must be 'l2', 'l1', 'activation' or a callable, "
                         f"got {importance!r}")
    if (importance == "activation") != (calib_data is not None):
        raise ValueError("structured: importance='activation' needs calib_data, and calib_data is "
                         "used only by importance='activation'")
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    unknown = [kind for kind in targets if kind not in GROUP_KINDS]
    if unknown or not targets:
        raise ValueError(f"structured: targets must be a non-empty subset of {GROUP_KINDS}, got "
                         f"{targets!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"structured: round_to must be a positive integer, got {round_to!r}")
    return targets


def structured(model: nn.Module, ratio: float, example_inputs: Any, importance: Importance = "l2",
               targets: Iterable[str] = GROUP_KINDS, ignore: Iterable[str] = (),
               round_to: int = 1, calib_data: Optional[Iterable[Any]] = None) -> nn.Module:
    """Remove whole neurons / channels / attention heads from ``model`` and shrink its layers.

    The model is changed in place -- every touched ``nn.Linear`` / ``nn.ConvNd`` /
    ``nn.BatchNormNd`` is replaced by a new, smaller layer holding the kept slices -- and returned;
    a :class:`StructuredReport` of what was removed is attached as ``model.structured_report``.
    The model's output shape never changes: the channels of residual streams and of the output are
    never pruned (see the module docstring for how dependency groups are found and which are left
    alone; the report lists them with the reason). Optimizers built before pruning hold the old
    parameters: build them again.

    Args:
        model: any ``nn.Module``: a ``torch.fx``-traceable one, or a ``transformers`` model with
            BERT- or LLaMA-style blocks.
        ratio: fraction in [0, 1) of the units of every prunable group to remove. A group of n
            units keeps ``n - floor(ratio * n)`` (at least one), rounded up to a multiple of
            ``round_to``. The units are neurons (Linear outputs), channels (conv outputs), heads,
            or key/value groups (grouped-query attention: a K/V head with its query heads).
        example_inputs: one batch, by the batch convention of ``sparseq.calib`` (a tensor
            ``model(x)``, a tuple/list ``model(*x)``, a dict ``model(**x)``). It is run to trace
            shapes / verify recognised blocks, and again after pruning to check that the output
            shape is unchanged.
        importance: how to score a unit (higher is kept): ``"l2"`` -- the L2 norm of all the
            weights that leave and enter the unit (producer rows / out-channels and consumer
            columns / in-channels, together); ``"l1"`` -- the sum of their magnitudes;
            ``"activation"`` -- the energy the unit sends into the layers that read it on
            ``calib_data``, sqrt(sum_j ||W[:, j]||^2 * sum x_j^2) over its input features j of
            those layers (Wanda's |W| * ||x|| for whole units); or a callable
            ``fn(group_name, unit_weights) -> Tensor[units]`` where ``unit_weights`` is the list
            of the group's weight tensors, each reshaped to ``(units, -1)``.
        targets: which kinds of groups to prune, a subset of ``GROUP_KINDS``: ``"linear"``
            (Linear -> Linear chains), ``"conv"`` (conv channels, with their BatchNorm),
            ``"ffn"`` (transformer feed-forward width), ``"heads"`` (attention heads).
        ignore: fnmatch patterns of module names; a group touching such a module (or one under
            it) is left alone.
        round_to: keep a multiple of this many units per group (e.g. 8 for kernel-friendly
            widths), rounding the kept count up.
        calib_data: an iterable of batches (the sparseq.calib convention), needed by and only
            by ``importance="activation"``.

    Raises:
        TypeError / ValueError: a model that is not an nn.Module, ratio outside [0, 1), an unknown
            importance or target kind, example_inputs the model rejects, a model that cannot be
            analysed (naming the module where tracing failed), no prunable group (with the
            reasons), calib_data missing / given without importance="activation" / rejected by
            the model. Nothing is changed in the model when an error is raised.
    """
    targets = _check_arguments(model, ratio, importance, targets, round_to, calib_data)
    ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)

    blocks = _transformer_blocks(model)
    watched = [module for _, watch, _ in blocks for module in watch]
    reference, recorder = _run_and_shape(model, example_inputs, watched)
    skipped: Dict[str, str] = {}
    if blocks:
        groups = []
        for group, _, verify in blocks:
            problem = verify(recorder)
            if problem:
                skipped[group.name] = problem
            else:
                groups.append(group)
    else:
        groups, skipped = _fx_groups(model, example_inputs)
    del recorder

    modules = dict(model.named_modules())
    chosen = []
    for group in groups:
        if group.kind not in targets:
            continue
        if any(name_matches(member.name, ignore) for member in group.members):
            skipped[group.name] = "ignored"
            continue
        chosen.append(group)
    if not chosen:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items()) or "none found"
        raise ValueError(f"structured: no prunable group in {type(model).__name__} for targets "
                         f"{targets} (groups left alone -- {reasons})")

    energy = _input_energy(model, chosen, modules, calib_data) if calib_data is not None else None
    # The whole plan first (scores, indices, new layers); nothing in the model changes until it
    # is complete.
    params_before = _parameter_count(model)
    index: Dict[str, Dict[int, torch.Tensor]] = {}
    reports, updates = [], []
    for group in chosen:
        scores = _scores(group, modules, importance, energy)
        keep = _units_kept(group.num_units, float(ratio), round_to)
        kept = torch.sort(torch.argsort(scores.cpu(), descending=True, stable=True)[:keep]).values
        for member in group.members:
            per_module = index.setdefault(member.name, {})
            if member.dim in per_module:
                raise ValueError(f"structured: {member.name} belongs to two groups along the same "
                                 f"dimension; cannot analyse {type(model).__name__}")
            per_module[member.dim] = _member_index(member, kept)
        updates += group.attribute_updates(kept)
        reports.append(GroupReport(group.name, group.kind, group.unit, group.num_units, keep,
                                   kept.tolist(), [member.name for member in group.members]))
    new_modules = {name: _rebuilt(modules[name], dims) for name, dims in index.items()}
    old_attributes = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in updates]

    def put(replacements: Dict[str, nn.Module], attributes) -> None:
        swap_modules(model, lambda module, name: replacements.get(name))
        for owner, attribute, value in attributes:
            setattr(owner, attribute, value)

    put(new_modules, updates)
    try:
        pruned_output, _ = _run_and_shape(model, example_inputs)
        if pruned_output.shape != reference.shape:
            raise ValueError(f"the output shape changed from {tuple(reference.shape)} to "
                             f"{tuple(pruned_output.shape)}")
    except Exception as exc:
        put({name: modules[name] for name in new_modules}, old_attributes)
        raise ValueError(f"structured: the pruned {type(model).__name__} failed the check on "
                         f"example_inputs ({exc}); the model was restored unchanged") from exc

    model.structured_report = StructuredReport(reports, skipped, params_before,
                                               _parameter_count(model))
    return model
