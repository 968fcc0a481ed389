"""Distiller: train a compressed student to reproduce a dense teacher."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..calib import (batch_to, call_model, eval_mode, iter_batches, main_output, model_device,
                     training_mode)
from .losses import attention_loss, kd_loss, representation_loss

logger = logging.getLogger("sparseq.distill")

OUTPUT_KINDS = ("auto", "logits", "hidden")

# Modules whose output width (the size of the last dim of their output) is known without running them.
_WIDTH_ATTRIBUTES = ((nn.Linear, "out_features"), (nn.Embedding, "embedding_dim"),
                     (nn.LayerNorm, "normalized_shape"), (nn.RMSNorm, "normalized_shape"))


def _static_width(module: nn.Module) -> Optional[int]:
    for cls, attribute in _WIDTH_ATTRIBUTES:
        if isinstance(module, cls):
            value = getattr(module, attribute)
            return int(value[-1]) if isinstance(value, (tuple, list)) else int(value)
    return None


def _projection_key(student_name: str) -> str:
    # nn.ModuleDict keys cannot contain dots.
    return student_name.replace(".", "__")


class _FeatureCapture:
    """Forward hooks that keep the main output tensor of named submodules for one forward."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.outputs: Dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def active(self):
        self.outputs = {}
        handles = []
        try:
            for name, module in self.modules.items():
                def hook(mod, args, output, _name=name):
                    self.outputs[_name] = main_output(output)
                handles.append(module.register_forward_hook(hook))
            yield self.outputs
        finally:
            for handle in handles:
                handle.remove()


class Distiller:
    """Knowledge distillation from ``teacher`` into ``student`` (both any nn.Module).

    The loss of one batch is the sum of
      - the output term, chosen by ``output_kind``:
          "logits": Hinton KD, alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s,
            labels), or the KL term alone when the batch has no labels (see losses.kd_loss);
          "hidden": MSE + (1 - cosine) between the outputs (a sentence encoder's hidden states,
            an embedding; see losses.representation_loss);
          "auto" (default): "logits" when the output has a ``logits`` field (transformers heads)
            or the batch has labels, else "hidden".
        The compared tensor is sparseq.calib.main_output of each model's output (``logits``,
        else ``last_hidden_state`` of a transformers output). When the inputs are a dict with an
        ``attention_mask`` of the output's [batch, seq] shape, only unmasked positions count.
        ``loss=fn(student_out, teacher_out, labels) -> scalar`` replaces this term.
      - feature_weight * the sum over ``features={student_module: teacher_module}`` of the MSE
        between the two modules' outputs, the student's passed through a learned nn.Linear
        projection (student width -> teacher width) where the widths differ. Features are
        compared along their last dim.
      - with ``attention=True``, attention_weight * the mean over student layers of KL(teacher ||
        student) between attention probabilities (transformers models called with
        output_attentions=True; student layer i is matched to teacher layer
        round((i + 1) * L_teacher / L_student) - 1, so a 6-layer student learns from every
        second layer of a 12-layer teacher).

    teacher, student: nn.Modules; the teacher runs in eval mode without gradients.
    temperature (> 0), alpha (in [0, 1]): the KD softening temperature and soft/hard balance.
    features: {student submodule name: teacher submodule name}; projection=False makes a width
      mismatch an error instead of learning a projection.
    example_inputs: one input batch (by the sparseq.calib convention), needed only when a feature
      module's output width cannot be read from the module (anything but Linear, Embedding,
      LayerNorm): both models run it once, without gradients, to measure the widths.
    Projections are created here, on the student's device, so the optimizer can hold them:
    ``Distiller.parameters()`` (or ``.projections``) gives them; ``fit`` adds them itself.
    The student's own parameters, masks and optimizer hooks (pruning masks, QAT fake-quant) are
    left to the student and the optimizer: the Distiller only computes the loss.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float = 4.0,
                 alpha: float = 0.5, features: Optional[Mapping[str, str]] = None,
                 projection: bool = True, attention: bool = False,
                 loss: Optional[Callable[[Any, Any, Optional[torch.Tensor]], torch.Tensor]] = None,
                 output_kind: str = "auto", feature_weight: float = 1.0,
                 attention_weight: float = 1.0, example_inputs: Any = None) -> None:
        for what, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{what} must be an nn.Module, got {type(model).__name__}")
        if teacher is student:
            raise ValueError("teacher and student are the same module; distil into a copy")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be a callable (student_out, teacher_out, labels) -> tensor, "
                            f"got {type(loss).__name__}")
        for what, weight in (("feature_weight", feature_weight), ("attention_weight", attention_weight)):
            if not (isinstance(weight, (int, float)) and weight >= 0):
                raise ValueError(f"{what} must be a non-negative number, got {weight!r}")
        features = dict(features or {})
        student_modules = self._named_submodules(student, features.keys(), "student")
        teacher_modules = self._named_submodules(teacher, features.values(), "teacher")
        if attention:
            for what, model in (("teacher", teacher), ("student", student)):
                if not hasattr(getattr(model, "config", None), "output_attentions"):
                    raise ValueError(f"attention=True needs transformers models (called with "
                                     f"output_attentions=True); the {what} "
                                     f"{type(model).__name__} has no transformers config")

        self.teacher, self.student = teacher, student
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.features = features
        self.attention = attention
        self.custom_loss = loss
        self.output_kind = output_kind
        self.feature_weight, self.attention_weight = float(feature_weight), float(attention_weight)
        self._student_capture = _FeatureCapture({s: student_modules[s] for s in features})
        self._teacher_capture = _FeatureCapture({s: teacher_modules[t] for s, t in features.items()})
        self.projections = self._make_projections(student_modules, teacher_modules, projection,
                                                  example_inputs)
        self.last_terms: Dict[str, float] = {}

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _named_submodules(model: nn.Module, names, what: str) -> Dict[str, nn.Module]:
        available = dict(model.named_modules())
        found = {}
        for name in names:
            if not isinstance(name, str) or name not in available:
                raise ValueError(f"features: {what} has no submodule named {name!r}; names look like "
                                 f"{[n for n in list(available)[1:6]]}")
            found[name] = available[name]
        return found

    def _make_projections(self, student_modules, teacher_modules, projection: bool,
                          example_inputs: Any) -> nn.ModuleDict:
        widths = {}
        for student_name, teacher_name in self.features.items():
            widths[student_name] = (_static_width(student_modules[student_name]),
                                    _static_width(teacher_modules[teacher_name]))
        if any(None in pair for pair in widths.values()):
            if example_inputs is None:
                unknown = [f"student {s!r} / teacher {self.features[s]!r}" for s, pair in widths.items()
                           if None in pair]
                raise ValueError(f"cannot tell the output width of {', '.join(unknown)} without running "
                                 "them; pass example_inputs=<one input batch> so the Distiller can "
                                 "measure it")
            widths = self._measure_widths(example_inputs)
        projections = nn.ModuleDict()
        device = model_device(self.student)
        for student_name, (student_width, teacher_width) in widths.items():
            if student_width == teacher_width:
                continue
            if not projection:
                raise ValueError(f"feature widths differ: student {student_name!r} gives {student_width}, "
                                 f"teacher {self.features[student_name]!r} gives {teacher_width}; "
                                 "use projection=True to learn a projection between them")
            projections[_projection_key(student_name)] = nn.Linear(student_width, teacher_width,
                                                                   device=device)
        return projections

    def _measure_widths(self, example_inputs: Any) -> Dict[str, Tuple[int, int]]:
        with self._student_capture.active() as student_out, self._teacher_capture.active() as teacher_out:
            for model in (self.student, self.teacher):
                with eval_mode(model), torch.no_grad():
                    call_model(model, batch_to(example_inputs, model_device(model)))
        missing = [name for name in self.features if name not in student_out or name not in teacher_out]
        if missing:
            raise ValueError(f"features {missing} produced no output on example_inputs (the modules "
                             "did not run in the forward pass)")
        return {name: (student_out[name].shape[-1], teacher_out[name].shape[-1]) for name in self.features}

    def parameters(self):
        """The Distiller's own trainable parameters (the feature projections), for the optimizer."""
        return self.projections.parameters()

    # ------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _split(batch: Any) -> Tuple[Any, Optional[torch.Tensor]]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("a Distiller batch is an (inputs, labels) pair (labels may be None), got "
                            f"{type(batch).__name__}"
                            f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}")
        return batch[0], batch[1]

    def _forward(self, model: nn.Module, inputs: Any) -> Any:
        if self.attention:
            model = functools.partial(model, output_attentions=True)
        return call_model(model, inputs)

    def loss(self, batch: Any) -> torch.Tensor:
        """The distillation loss of one ``(inputs, labels)`` batch, a scalar tensor with gradients
        for the student (and the projections). inputs follow the sparseq.calib batch convention;
        labels may be None. The terms are kept, as floats, in ``self.last_terms``."""
        inputs, labels = self._split(batch)
        student_device = model_device(self.student)
        with self._teacher_capture.active() as teacher_features, eval_mode(self.teacher), torch.no_grad():
            teacher_out = self._forward(self.teacher, batch_to(inputs, model_device(self.teacher)))
        with self._student_capture.active() as student_features:
            student_out = self._forward(self.student, batch_to(inputs, student_device))
        if labels is not None:
            labels = batch_to(labels, student_device)
        mask = self._position_mask(inputs, student_device)

        output_term = self._output_loss(student_out, teacher_out, labels, mask)
        total = output_term
        terms = {"output": output_term.item()}
        if self.features:
            feature_term = self._feature_loss(student_features, teacher_features, student_device)
            total = total + self.feature_weight * feature_term
            terms["features"] = feature_term.item()
        if self.attention:
            attention_term = self._attention_loss(student_out, teacher_out, student_device)
            total = total + self.attention_weight * attention_term
            terms["attention"] = attention_term.item()
        terms["total"] = total.item()
        self.last_terms = terms
        return total

    @staticmethod
    def _position_mask(inputs: Any, device: torch.device) -> Optional[torch.Tensor]:
        if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), torch.Tensor):
            return inputs["attention_mask"].to(device).bool()
        return None

    def _resolve_kind(self, student_out: Any, labels: Optional[torch.Tensor]) -> str:
        if self.output_kind != "auto":
            return self.output_kind
        has_logits = (isinstance(student_out, Mapping) or hasattr(student_out, "keys")) and \
            "logits" in student_out.keys()
        return "logits" if has_logits or labels is not None else "hidden"

    def _output_loss(self, student_out: Any, teacher_out: Any, labels: Optional[torch.Tensor],
                     mask: Optional[torch.Tensor]) -> torch.Tensor:
        student_main = main_output(student_out)
        teacher_main = main_output(teacher_out).to(student_main.device)
        if self.custom_loss is not None:
            value = self.custom_loss(student_main, teacher_main, labels)
            if not (isinstance(value, torch.Tensor) and value.dim() == 0):
                raise TypeError(f"loss= must return a scalar tensor, got "
                                f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}")
            return value
        if student_main.shape != teacher_main.shape:
            raise ValueError(f"student output of shape {tuple(student_main.shape)} does not match "
                             f"teacher output of shape {tuple(teacher_main.shape)}; the output term "
                             "compares them element by element (pass loss= for another comparison)")
        if mask is not None and mask.shape == student_main.shape[:2] and student_main.dim() >= 3:
            # Padding positions carry no meaning (pooling and the labels skip them): leave them out.
            student_main, teacher_main = student_main[mask], teacher_main[mask]
            if labels is not None and labels.shape[:2] == mask.shape:
                labels = labels[mask]
        if self._resolve_kind(student_out, labels) == "logits":
            return kd_loss(student_main, teacher_main, labels, self.temperature, self.alpha)
        return representation_loss(student_main, teacher_main)

    def _feature_loss(self, student_features: Dict[str, torch.Tensor],
                      teacher_features: Dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for student_name, teacher_name in self.features.items():
            if student_name not in student_features or student_name not in teacher_features:
                side = "student" if student_name not in student_features else "teacher"
                name = student_name if side == "student" else teacher_name
                raise ValueError(f"feature {side} module {name!r} did not run in the forward pass")
            student_feature = student_features[student_name].float()
            teacher_feature = teacher_features[student_name].to(device).float()
            key = _projection_key(student_name)
            if key in self.projections:
                student_feature = self.projections[key](student_feature)
            if student_feature.shape != teacher_feature.shape:
                raise ValueError(f"feature shapes differ: student {student_name!r} "
                                 f"{tuple(student_feature.shape)} (after projection) vs teacher "
                                 f"{teacher_name!r} {tuple(teacher_feature.shape)}")
            total = total + torch.nn.functional.mse_loss(student_feature, teacher_feature)
        return total

    def _attention_loss(self, student_out: Any, teacher_out: Any, device: torch.device) -> torch.Tensor:
        maps = {}
        for what, out in (("student", student_out), ("teacher", teacher_out)):
            attentions = getattr(out, "attentions", None)
            if attentions is None and isinstance(out, Mapping):
                attentions = out.get("attentions")
            if not attentions or any(a is None for a in attentions):
                raise ValueError(f"attention=True: the {what} returned no attention maps with "
                                 "output_attentions=True; sdpa / flash attention do not return them, "
                                 "so load the model with attn_implementation='eager' (or call "
                                 "model.set_attn_implementation('eager'))")
            maps[what] = attentions
        student_layers, teacher_layers = len(maps["student"]), len(maps["teacher"])
        if student_layers > teacher_layers:
            raise ValueError(f"attention=True: the student has more attention layers ({student_layers}) "
                             f"than the teacher ({teacher_layers})")
        total = torch.zeros((), device=device)
        for index, student_map in enumerate(maps["student"]):
            teacher_index = round((index + 1) * teacher_layers / student_layers) - 1
            total = total + attention_loss(student_map, maps["teacher"][teacher_index].to(device))
        return total / student_layers

    # ------------------------------------------------------------------------------------------
    # training loop
    # ------------------------------------------------------------------------------------------

    def fit(self, loader: Any, optimizer: torch.optim.Optimizer, epochs: int = 1,
            max_steps: Optional[int] = None, log_every: int = 50, progress: bool = True,
            scheduler: Any = None) -> List[float]:
        """Train the student on ``loader`` (an iterable of ``(inputs, labels)`` batches) for
        ``epochs`` passes or ``max_steps`` optimizer steps, whichever ends first; return the loss
        of every step.

        optimizer: holds the student's parameters; the projections are added to it (as a new
        param group) if it does not hold them yet. Its step hooks (e.g. pruning masks attached
        with Masks.attach) run as usual. scheduler: stepped after every optimizer step, if given.
        The student trains in train mode and gets its modes back afterwards. A tqdm bar shows
        the running loss (progress=False hides it); every ``log_every`` steps the mean loss
        and its terms are logged to the "sparseq.distill" logger (log_every=0: never).
        Arguments are checked before the first step; a batch that fails later raises naming
        the step, and the student keeps the steps already taken.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (isinstance(epochs, int) and epochs >= 1):
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if max_steps is not None and not (isinstance(max_steps, int) and max_steps >= 1):
            raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
        if not (isinstance(log_every, int) and log_every >= 0):
            raise ValueError(f"log_every must be a non-negative integer, got {log_every!r}")
        self._add_projections_to(optimizer)
        from tqdm.auto import tqdm

        total_steps = max_steps
        if hasattr(loader, "__len__"):
            per_epoch = len(loader) * epochs
            total_steps = per_epoch if max_steps is None else min(max_steps, per_epoch)
        history: List[float] = []
        window: List[Dict[str, float]] = []
        with training_mode(self.student), tqdm(total=total_steps, disable=not progress,
                                             desc="distill", unit="step") as bar:
            for epoch in range(epochs):
                for batch in iter_batches(loader, "loader"):
                    if max_steps is not None and len(history) >= max_steps:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        loss = self.loss(batch)
                    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                        raise ValueError(f"distillation step {len(history)} (epoch {epoch}) failed: "
                                         f"{type(exc).__name__}: {exc}") from exc
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"distillation loss is {loss.item()} at step "
                                                 f"{len(history)} (epoch {epoch}); terms {self.last_terms}")
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    history.append(loss.item())
                    window.append(self.last_terms)
                    bar.update(1)
                    bar.set_postfix(loss=f"{history[-1]:.4g}")
                    if log_every and len(history) % log_every == 0:
                        means = {key: sum(t[key] for t in window) / len(window) for key in window[0]}
                        logger.info("step %d (epoch %d): %s", len(history), epoch,
                                    ", ".join(f"{key} {value:.4g}" for key, value in means.items()))
                        window = []
                if max_steps is not None and len(history) >= max_steps:
                    break
        return history

    def _add_projections_to(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.parameters() if id(p) not in held]
        if missing:
            optimizer.add_param_group({"params": missing})
