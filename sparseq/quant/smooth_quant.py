"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8.

For a Linear group reading the same input X (q/k/v after a LayerNorm, fc1/up/gate after an
RMSNorm, ...), each input channel j gets s_j = max|X_j|^alpha / max|W_j|^(1-alpha); the producer of
X is rescaled so it emits X_j / s_j (a norm's weight and bias, or a preceding Linear's output
rows), and the consumers' weight columns are multiplied by s_j. The float model computes the same
function; its activations are flatter and quantize with less error.

Producers are found on the calibration data: forward hooks record the output tensors of the
candidate producers (modules with a 1-D ``weight`` of the channel count: LayerNorm, RMSNorm,
transformers' LlamaRMSNorm, ...; and Linears), and a consumer whose input is one of those
tensors (same storage) is read from it. Attention's output projection, whose input is a mix of
the value projection's output, takes its scale from a value-like Linear nearby. Every fold is
first tried with random scales and kept only if the model's output stays the same (that catches
a norm output that also feeds a residual connection, or a norm that is not a per-channel
affine map); the rest are left alone and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from ..calib import (all_or_nothing, batch_to, call_model, eval_mode, input_hooks, iter_batches, model_device,
                     run_batches, token_rows)
from .calibrate import named_targets

# A fold is kept when the model output moves by at most this fraction of its largest magnitude.
_EQUAL_RTOL = 1e-4


@dataclass
class SmoothGroup:
    """One fold: ``producer`` now emits X / s, the ``consumers`` had their columns multiplied by s."""
    producer: str
    consumers: List[str]
    kind: str  # "norm" (a 1-D weight) or "linear" (output rows)
    s_min: float
    s_max: float


@dataclass
class SmoothQuantReport:
    """What smooth_quant did: the groups it smoothed and the Linears it left alone, with why."""
    alpha: float
    smoothed: List[SmoothGroup] = field(default_factory=list)
    left_alone: Dict[str, str] = field(default_factory=dict)

    @property
    def smoothed_layers(self) -> List[str]:
        return [name for group in self.smoothed for name in group.consumers]

    def table(self) -> str:
        lines = [f"SmoothQuant alpha={self.alpha}: {len(self.smoothed_layers)} Linear layers smoothed, "
                 f"{len(self.left_alone)} left alone"]
        for g in self.smoothed:
            lines.append(f"  {g.producer} ({g.kind}) -> {', '.join(g.consumers)}   s in [{g.s_min:.3g}, {g.s_max:.3g}]")
        for name, why in self.left_alone.items():
            lines.append(f"  left alone: {name}: {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _norm_like(module: nn.Module, channels: int) -> bool:
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and weight.numel() == channels and weight.is_floating_point())


def _foldable_producer(module: nn.Module, channels: int) -> Optional[str]:
    if isinstance(module, nn.Linear) and module.out_features == channels:
        return "linear"
    if _norm_like(module, channels):
        return "norm"
    return None


def _storage_key(t: torch.Tensor) -> Tuple[int, int, int]:
    return (t.data_ptr(), t.numel(), t.shape[-1] if t.dim() else 0)


class _Stats:
    """Per input channel max |x| of each target Linear, and which module produced its input."""

    def __init__(self, model: nn.Module, layers: Dict[str, nn.Module]) -> None:
        self.layers = layers
        self.act_max: Dict[str, torch.Tensor] = {}
        self.producers: Dict[str, set] = {name: set() for name in layers}
        self.unmatched: set = set()
        widths = {layer.in_features for layer in layers.values()}
        self.candidates = {name: module for name, module in model.named_modules()
                           if name and any(_foldable_producer(module, k) for k in widths)}
        self.outputs: Dict[Tuple[int, int, int], Tuple[List[str], torch.Tensor]] = {}
        self.discover = True

    def on_output(self, name: str, output: Any) -> None:
        if self.discover and isinstance(output, torch.Tensor):
            # The tensor itself is kept until the batch ends so its storage cannot be reused by
            # another tensor, which would then match by address.
            names, _ = self.outputs.setdefault(_storage_key(output), ([], output))
            names.append(name)

    def on_input(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        x = x.detach()
        if not torch.isfinite(x).all():
            raise ValueError(f"smooth_quant: the input of layer {name!r} contains NaN or Inf")
        channel_max = token_rows(x).abs().amax(dim=0).float().cpu()
        previous = self.act_max.get(name)
        self.act_max[name] = channel_max if previous is None else torch.maximum(previous, channel_max)
        if self.discover:
            producers = [p for p in self.outputs.get(_storage_key(x), ([], None))[0]
                         if _foldable_producer(self.candidates[p], x.shape[-1])]
            if producers:
                self.producers[name].add(producers[0])  # the innermost: its hook fired first
            else:
                self.unmatched.add(name)

    def end_batch(self) -> None:
        self.outputs.clear()
        self.discover = False  # one batch shows the wiring; the rest only add statistics


def _scales(act_max: torch.Tensor, weights: List[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(dim=0).float().cpu() for w in weights]).amax(dim=0)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    # A channel that is zero on either side carries nothing to balance.
    s = torch.where((act_max > 0) & (w_max > 0), s, torch.ones_like(s))
    if any(w.dtype in (torch.bfloat16, torch.float16) for w in weights):
        # In bf16/fp16 a fold by any other factor re-rounds the weights and moves the output;
        # by powers of two it is exact, and migrates the range to within a factor of sqrt(2).
        s = torch.pow(2.0, torch.round(torch.log2(s)))
    return s


def _output_tensors(output: Any) -> List[torch.Tensor]:
    """Every tensor of a model's output (a tensor, tuple/list, dict or transformers output), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _output_tensors(item)]
    if isinstance(output, dict) or hasattr(output, "keys"):
        return [t for key in output.keys() for t in _output_tensors(output[key])]
    return []


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal within float rounding: every element within _EQUAL_RTOL of the largest magnitude."""
    if out.shape != ref.shape:
        return False
    tol = _EQUAL_RTOL * float(ref.abs().max()) + 1e-12 if ref.numel() else 0.0
    return bool(((out - ref).abs() <= tol).all())


class _Folder:
    """Applies folds to the model, probing each one first on a batch."""

    def __init__(self, model: nn.Module, probe_batch: Any, layers: List[nn.Module]) -> None:
        self.model = model
        self.batch = batch_to(probe_batch, model_device(model))
        # The layers' inputs now, kept up to date as folds divide them (one forward per probe).
        self.reference, inputs = self.run(layers)
        self.inputs = {id(layer): xs for layer, xs in zip(layers, inputs)}

    def run(self, consumers: List[nn.Module]) -> Tuple[List[torch.Tensor], List[List[torch.Tensor]]]:
        """The model's float output tensors on the probe batch, and the inputs of ``consumers``."""
        inputs: List[List[torch.Tensor]] = [[] for _ in consumers]
        with input_hooks({str(i): c for i, c in enumerate(consumers)},
                         lambda name, module, x: inputs[int(name)].append(x.detach().float().clone())):
            with eval_mode(self.model), torch.no_grad():
                output = call_model(self.model, self.batch)
        return [t.detach().float() for t in _output_tensors(output) if t.is_floating_point()], inputs

    def same_output(self) -> bool:
        """Whether every float output tensor is where it was at the start, within float rounding."""
        outputs, _ = self.run([])
        return len(outputs) == len(self.reference) and all(map(_close, outputs, self.reference))

    @staticmethod
    def apply(producer: nn.Module, kind: str, consumers: List[nn.Module], s: torch.Tensor) -> None:
        with torch.no_grad():
            w = producer.weight
            if kind == "linear":
                w.div_(s.to(w)[:, None])
            else:
                w.div_(s.to(w))
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(s.to(producer.bias))
            for consumer in consumers:
                consumer.weight.mul_(s.to(consumer.weight)[None, :])

    def try_fold(self, producer: nn.Module, kind: str, consumers: List[nn.Module], s: torch.Tensor) -> bool:
        """Fold random scales r first: the fold is kept (with ``s``) only if every consumer's input
        became x / r and the model's outputs did not move; otherwise it is undone."""
        touched = [producer] + consumers
        saved = [{k: v.detach().clone() for k, v in m.named_parameters(recurse=False)} for m in touched]
        before = [self.inputs[id(c)] for c in consumers]
        # Powers of two in [1/2, 2] (never all 1): exact in every float format, so the probe
        # tests the wiring and not the rounding of bf16/fp16 weights.
        exponents = torch.randint(-1, 2, s.shape, generator=torch.Generator().manual_seed(len(s)))
        exponents[0] = 1
        probe = torch.pow(2.0, exponents.float())
        self.apply(producer, kind, consumers, probe)
        outputs, after = self.run(consumers)
        valid = (len(outputs) == len(self.reference) and all(map(_close, outputs, self.reference))
                 and all(len(a) == len(b) and len(b) > 0 and all(_close(x_after, x_before / probe.to(x_before))
                                                                for x_after, x_before in zip(a, b))
                         for a, b in zip(after, before)))
        with torch.no_grad():
            for module, params in zip(touched, saved):
                for k, v in params.items():
                    getattr(module, k).copy_(v)
        if valid:
            self.apply(producer, kind, consumers, s)
            for consumer, xs in zip(consumers, before):
                self.inputs[id(consumer)] = [x / s.to(x) for x in xs]
        return valid


def smooth_quant(model: nn.Module, calib_data: Iterable[Any], alpha: float = 0.5,
                 targets: Tuple[Type[nn.Module], ...] = (nn.Linear,), skip: Iterable[str] = (),
                 max_batches: Optional[int] = None) -> SmoothQuantReport:
    """Apply SmoothQuant to ``model`` in place and return a SmoothQuantReport of what was smoothed.

    calib_data: an iterable of batches (dict -> model(**b), tuple/list -> model(*b), tensor ->
    model(b)); the per-channel activation maxima come from all of them (at most max_batches),
    the producer of each Linear's input from the first.
    alpha in [0, 1]: how much of the activation range moves into the weights
    (s_j = max|X_j|^alpha / max|W_j|^(1-alpha)); 0.5 is the paper's default.
    targets / skip: the Linear classes considered and fnmatch name patterns left alone.

    The model computes the same function afterwards (up to float rounding). Linears without a
    foldable producer are left alone and named in the report. An ``act_observer`` left by an
    earlier calibrate on a smoothed Linear is removed (its range is stale): calibrate after
    smoothing. Errors (bad alpha, data the model rejects, NaN activations) leave the model as it was.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"smooth_quant expects an nn.Module, got {type(model).__name__}")
    layers = {name: module for name, module in named_targets(model, targets, skip).items()
              if isinstance(module, nn.Linear)}
    if not layers:
        raise ValueError(f"smooth_quant found no Linear layers in the {type(model).__name__} "
                         f"(after skip={tuple(skip) if not isinstance(skip, str) else skip})")
    batches = list(iter_batches(calib_data, max_batches=max_batches))
    stats = _Stats(model, layers)
    handles = [module.register_forward_hook(lambda mod, args, out, _name=name: stats.on_output(_name, out))
               for name, module in stats.candidates.items()]
    try:
        with input_hooks(layers, stats.on_input):
            for batch in batches:
                run_batches(model, [batch])
                stats.end_batch()
    finally:
        for handle in handles:
            handle.remove()

    report = SmoothQuantReport(alpha=float(alpha))
    groups: Dict[str, List[str]] = {}
    orphans: List[str] = []  # Linears whose input no candidate module emitted as such
    for name in layers:
        if name not in stats.act_max:
            report.left_alone[name] = "the calibration data never reached it"
        elif len(stats.producers[name]) == 1 and name not in stats.unmatched:
            groups.setdefault(next(iter(stats.producers[name])), []).append(name)
        else:
            orphans.append(name)

    with all_or_nothing(model):
        folder = _Folder(model, batches[0], list(layers.values()))
        for producer_name, consumer_names in groups.items():
            producer = stats.candidates[producer_name]
            kind = _foldable_producer(producer, layers[consumer_names[0]].in_features)
            s = _scales(torch.stack([stats.act_max[c] for c in consumer_names]).amax(dim=0),
                        [layers[c].weight for c in consumer_names], alpha)
            if folder.try_fold(producer, kind, [layers[c] for c in consumer_names], s):
                report.smoothed.append(SmoothGroup(producer_name, consumer_names, kind,
                                                   float(s.min()), float(s.max())))
            else:
                report.left_alone.update({c: f"its producer {producer_name} is not a per-channel scale, or its "
                                             "output also feeds something else (e.g. a residual connection)"
                                          for c in consumer_names})
        for name in orphans:
            group = _value_producer(name, layers, stats, folder, alpha)
            if group is None:
                report.left_alone[name] = "no foldable producer of its input was found"
            else:
                report.smoothed.append(group)
        if not folder.same_output():
            raise RuntimeError("smooth_quant changed the model's output; nothing was applied")
    for name in report.smoothed_layers:
        if "act_observer" in vars(layers[name]):
            del layers[name].act_observer
    return report


def _value_producer(name: str, layers: Dict[str, nn.Module], stats: _Stats, folder: _Folder,
                    alpha: float) -> Optional[SmoothGroup]:
    """For a Linear whose input is a per-channel linear mix of another Linear's output (attention's
    output projection reading the value projection through softmax(QK^T) V): try the Linears of
    the same block (its parent module, then its grandparent; never the whole model) with as many
    outputs as it has inputs, keeping the first whose output rows fold."""
    consumer = layers[name]
    parts = name.split(".")
    tried = set()
    s = _scales(stats.act_max[name], [consumer.weight], alpha)
    for block in (".".join(parts[:-1]), ".".join(parts[:-2])):
        if not block:
            break
        for candidate_name, candidate in layers.items():
            if (candidate_name in tried or candidate is consumer or not candidate_name.startswith(block + ".")
                    or candidate.out_features != consumer.in_features):
                continue
            tried.add(candidate_name)
            if folder.try_fold(candidate, "linear", [consumer], s):
                return SmoothGroup(candidate_name, [name], "linear", float(s.min()), float(s.max()))
    return None
