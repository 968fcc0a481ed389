"""Running data through a model, the way every pass does it.

Calibration data and training loaders are iterables of batches. A batch is handed to the model
by its type: a dict as ``model(**batch)``, a tuple or list as ``model(*batch)``, a tensor as
``model(batch)``. Passes (pruning, quantization calibration, distillation) share these helpers so
the rule, its error messages and the way a model is restored after a failure are the same
everywhere.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn as nn

Batch = Any


def call_model(model: nn.Module, batch: Batch) -> Any:
    """``model`` applied to one batch by the batch convention (dict -> kwargs, tuple/list ->
    positional arguments, tensor -> the one argument)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise TypeError(f"a batch must be a dict (model(**batch)), a tuple/list (model(*batch)) or a "
                    f"tensor (model(batch)); got {type(batch).__name__}")


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with every tensor in it moved to ``device`` (nested dicts/tuples/lists too)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: batch_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(value, device) for value in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter or buffer lives (CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def iter_batches(data: Iterable[Batch], what: str = "calib_data",
                 max_batches: Optional[int] = None) -> Iterator[Batch]:
    """Yield the batches of ``data`` (at most ``max_batches``); a clear error for data that is
    not iterable, is a lone tensor or dict (a single batch must be wrapped in a list), or is
    empty."""
    if isinstance(data, (torch.Tensor, Mapping)):
        raise TypeError(f"{what} must be an iterable of batches (a list, a DataLoader, ...), not a "
                        f"single {type(data).__name__}; wrap one batch as [batch]")
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"{what} must be an iterable of batches, got {type(data).__name__}") from None
    count = 0
    for batch in iterator:
        if max_batches is not None and count >= max_batches:
            break
        count += 1
        yield batch
    if count == 0:
        raise ValueError(f"{what} is empty: at least one batch is needed")


# The attention mask of the batch run_batches is running (None when it has none): lets
# activation statistics leave out padded positions, whose values the model never uses.
_running_token_mask: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar(
    "sparseq_running_token_mask", default=None)


def batch_token_mask(batch: Batch) -> Optional[torch.Tensor]:
    """A dict batch's ``attention_mask`` [batch, tokens] as bool (True = a real token), else None."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.bool()
    return None


def token_rows(x: torch.Tensor) -> torch.Tensor:
    """An activation [..., features] as rows [n, features] for calibration statistics, without
    the rows of padded positions when the batch being run carries an ``attention_mask`` whose
    shape matches x's leading dims. (A padded position's activations are computed but masked
    out of attention and pooling: counting them would calibrate for inputs that never matter.)"""
    mask = _running_token_mask.get()
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def run_batches(model: nn.Module, data: Iterable[Batch], what: str = "calib_data",
                max_batches: Optional[int] = None) -> int:
    """Run every batch of ``data`` through ``model`` in eval mode without gradients (the
    caller's hooks see the activations); restore the training flags; return the batch count.

    A batch the model cannot take (wrong shape, wrong keys) raises ValueError naming the batch.
    While a dict batch with an ``attention_mask`` runs, token_rows() drops its padded positions.
    """
    device = model_device(model)
    count = 0
    with eval_mode(model), torch.no_grad():
        for index, batch in enumerate(iter_batches(data, what, max_batches)):
            batch = batch_to(batch, device)
            mask_token = _running_token_mask.set(batch_token_mask(batch))
            try:
                call_model(model, batch)
            except StopForward:
                pass
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise ValueError(f"{what}: batch {index} could not be run through the model "
                                 f"({type(exc).__name__}: {exc})") from exc
            finally:
                _running_token_mask.reset(mask_token)
            count += 1
    return count


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once everything it needs has been seen."""


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool = True):
    """The model in train (or eval) mode for the block; each submodule's own training flag
    restored after."""
    flags = {module: module.training for module in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


def eval_mode(model: nn.Module):
    """The model in eval mode for the block; each submodule's own training flag restored after."""
    return training_mode(model, False)


@contextlib.contextmanager
def input_hooks(modules: Mapping[str, nn.Module], fn: Callable[[str, nn.Module, torch.Tensor], None]):
    """Call ``fn(name, module, x)`` with the first positional input of each module on every
    forward, for the duration of the block."""
    handles = []
    try:
        for name, module in modules.items():
            def hook(mod, args, _name=name):
                if args and isinstance(args[0], torch.Tensor):
                    fn(_name, mod, args[0])
            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def main_output(output: Any) -> torch.Tensor:
    """The tensor a model's output stands for: the tensor itself, the first element of a
    tuple/list, ``logits`` / ``last_hidden_state`` of a dict or a ``transformers`` output object,
    else its first tensor value."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return main_output(output[0])
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        for key in ("logits", "last_hidden_state", "sentence_embedding"):
            if key in output.keys() and isinstance(output[key], torch.Tensor):
                return output[key]
        for key in output.keys():
            if isinstance(output[key], torch.Tensor):
                return output[key]
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


@contextlib.contextmanager
def all_or_nothing(model: nn.Module):
    """Undo every change to ``model``'s parameters and buffers if the block raises, so a pass
    that fails part way never leaves a model half-modified. (Module swaps are the caller's to
    stage: do them only after everything that can fail.)"""
    saved: Dict[str, torch.Tensor] = {name: tensor.detach().clone()
                                      for name, tensor in model.state_dict(keep_vars=True).items()
                                      if isinstance(tensor, torch.Tensor)}
    try:
        yield model
    except BaseException:
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for name, value in saved.items():
                target = current.get(name)
                if isinstance(target, torch.Tensor) and target.shape == value.shape:
                    target.copy_(value)
        raise
