"""The models and data `sparseq compress` and `sparseq bench model` take from the command line.

A MODEL is one of:
  - ``demo``: a small model defined here (a 2-layer BERT encoder built from transformers.BertConfig
    when transformers is installed, else an MLP), with fixed random weights: nothing is downloaded
    and every run builds the same model;
  - a folder holding a ``transformers`` model (config.json, weights, tokenizer files), loaded with
    AutoModel.from_pretrained from local files only;
  - a file written by ``torch.save(model, path)``: reading it runs pickle, which can execute any
    code, so only a user's own files belong here. sparseq's own files (safetensors) are refused
    with a pointer to ``sparseq inspect`` / ``sparseq.load``.

Calibration and training DATA is, for a transformers folder, a text file (one text per line,
tokenized with the folder's tokenizer) or a tensor file; for other models a tensor file: a tensor
[N, ...] saved with torch.save (read with weights_only=True, so no code runs) or a .safetensors
file holding it under the name "inputs", split into batches along the first dimension. The demo
model brings its own random calibration batches when no DATA is given.

Everything a user can get wrong here raises InputError (a ValueError) with a one-line message.
"""
from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

DEMO = "demo"
DEMO_SEED = 0
DEMO_CALIB_BATCHES = 8
# The demo BERT: big enough for every preset (2:4 needs K divisible by 4, 90% CSR needs rows of
# some length), small enough to compress in seconds.
DEMO_BERT = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=512, max_position_embeddings=512)
DEMO_MLP_FEATURES = (64, 256, 256, 64)

# Files torch.save writes are zip archives (since torch 1.6) or, older, raw pickles.
_ZIP_MAGIC = b"PK\x03\x04"
_TENSOR_SUFFIXES = (".pt", ".pth", ".bin", ".tensor", ".tensors")
_SAFETENSORS_INPUTS = "inputs"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


class InputError(ValueError):
    """A MODEL or DATA argument the command cannot use; the message is one line."""


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # "demo", "torch" (saved whole with torch.save) or "transformers"
    source: str  # the MODEL argument
    folder: Optional[str] = None  # a transformers model's folder (its tokenizer lives there)

    def describe(self) -> str:
        what = {"demo": "built-in demo model", "torch": "model saved with torch.save",
                "transformers": "transformers model folder"}[self.kind]
        return f"{self.source} ({what}: {type(self.model).__name__})"


def _transformers_or_none():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# the demo model


def demo_model() -> nn.Module:
    """The built-in demo model in eval mode: a BertModel (no pooler) from DEMO_BERT when
    transformers is installed, else an MLP over DEMO_MLP_FEATURES, its weights drawn from a
    fixed seed (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        transformers = _transformers_or_none()
        if transformers is not None:
            config = transformers.BertConfig(**DEMO_BERT)
            model = transformers.BertModel(config, add_pooling_layer=False)
        else:
            layers: List[nn.Module] = []
            for index, (fan_in, fan_out) in enumerate(zip(DEMO_MLP_FEATURES, DEMO_MLP_FEATURES[1:])):
                layers += [nn.GELU()] if index else []
                layers.append(nn.Linear(fan_in, fan_out))
            model = nn.Sequential(*layers)
    return model.eval()


def demo_batches(model: nn.Module, batch_size: int, seq_len: int,
                 count: int = DEMO_CALIB_BATCHES) -> List[Any]:
    """``count`` random input batches for demo_model(): {"input_ids", "attention_mask"} dicts of
    [batch_size, seq_len] tokens for the BERT (seq_len at most its position table), tensors
    [batch_size, features] for the MLP; the same on every call."""
    generator = torch.Generator().manual_seed(DEMO_SEED)
    config = getattr(model, "config", None)
    if config is not None:
        if seq_len > config.max_position_embeddings:
            raise InputError(f"--seq-len {seq_len} is longer than the demo model's "
                             f"{config.max_position_embeddings} positions")
        # Token 0 is BERT's [PAD]; real tokens start at 1.
        return [{"input_ids": torch.randint(1, config.vocab_size, (batch_size, seq_len), generator=generator),
                 "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
                for _ in range(count)]
    return [torch.randn(batch_size, DEMO_MLP_FEATURES[0], generator=generator) for _ in range(count)]


# --------------------------------------------------------------------------------------------
# MODEL


def _is_safetensors(path: str) -> bool:
    """True for a .safetensors name or a file laid out like one (8-byte header length, then JSON)."""
    if path.lower().endswith(".safetensors"):
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_length < os.path.getsize(path)


def load_model(spec: str, progress: bool = True) -> LoadedModel:
    """The model a MODEL argument names (module docstring), in eval mode on the CPU;
    progress=False hides transformers' loading bar."""
    if spec == DEMO:
        return LoadedModel(demo_model(), "demo", spec)
    if os.path.isdir(spec):
        return _load_transformers_folder(spec, progress)
    if not os.path.exists(spec):
        raise InputError(f"no such model file or folder: {spec} (a MODEL is a file saved with "
                         "torch.save(model, path), a transformers model folder, or 'demo')")
    if _is_safetensors(spec):
        raise InputError(f"{spec} is a safetensors file, not a model saved with torch.save: a file written "
                         "by sparseq.save is already compressed (see it with `sparseq inspect "
                         f"{spec}`, load it in Python with sparseq.load); a transformers checkpoint "
                         "goes in with its folder")
    try:
        # Unpickling runs code from the file: the --help says MODEL must be the user's own file.
        model = torch.load(spec, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle raises many types (UnpicklingError, EOFError, AttributeError, ...)
        hint = (" (the model's class must be importable here, as where it was saved)"
                if isinstance(exc, (AttributeError, ModuleNotFoundError)) else "")
        raise InputError(f"cannot read {spec} with torch.load: {type(exc).__name__}: {_one_line(exc)}{hint}") from None
    if not isinstance(model, nn.Module):
        hint = (" (a state_dict holds weights without the model: torch.save the module itself)"
                if isinstance(model, dict) else "")
        raise InputError(f"{spec} holds a {type(model).__name__}, not an nn.Module saved whole with "
                         f"torch.save(model, path){hint}")
    return LoadedModel(model.eval(), "torch", spec)


@contextlib.contextmanager
def _transformers_progress(transformers, show: bool):
    """transformers' own progress bars on or off for the block, as they were after."""
    bars = transformers.utils.logging
    was_enabled = bars.is_progress_bar_enabled()
    (bars.enable_progress_bar if show else bars.disable_progress_bar)()
    try:
        yield
    finally:
        (bars.enable_progress_bar if was_enabled else bars.disable_progress_bar)()


def _load_transformers_folder(folder: str, progress: bool) -> LoadedModel:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InputError(f"{folder} is a folder without config.json: not a transformers model folder")
    transformers = _transformers_or_none()
    if transformers is None:
        raise InputError(f"{folder} is a transformers model folder: install transformers to load it")
    # The folder is all there is: nothing may be fetched from the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with _transformers_progress(transformers, progress):
            model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for bad folders
        raise InputError(f"cannot load a transformers model from {folder}: {_one_line(exc)}") from None
    return LoadedModel(model.eval(), "transformers", folder, folder=folder)


# --------------------------------------------------------------------------------------------
# DATA


def load_batches(path: str, loaded: LoadedModel, batch_size: int, seq_len: int,
                 progress: bool = False, what: str = "--calib") -> List[Any]:
    """The input batches in the DATA file ``path`` (module docstring) for ``loaded``'s model:
    token dicts from a text file (transformers folders), else slices of batch_size along the
    first dimension of a stored tensor."""
    if not os.path.isfile(path):
        raise InputError(f"{what}: no such file: {path}")
    if path.lower().endswith(".safetensors"):
        return _split(_safetensors_inputs(path, what), batch_size, path, what)
    if _is_tensor_file(path) or loaded.kind != "transformers":
        return _split(_torch_tensor(path, what), batch_size, path, what)
    return _tokenized_lines(path, loaded, batch_size, seq_len, progress, what)


def _is_tensor_file(path: str) -> bool:
    if path.lower().endswith(_TENSOR_SUFFIXES):
        return True
    with open(path, "rb") as handle:
        return handle.read(4) == _ZIP_MAGIC


def _safetensors_inputs(path: str, what: str) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{what}: cannot read {path} as safetensors: {_one_line(exc)}") from None
    if _SAFETENSORS_INPUTS not in tensors:
        raise InputError(f"{what}: {path} has no tensor named {_SAFETENSORS_INPUTS!r} (it holds "
                         f"{', '.join(sorted(tensors)) or 'nothing'})")
    return tensors[_SAFETENSORS_INPUTS]


def _torch_tensor(path: str, what: str) -> torch.Tensor:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle the safe loader refuses, a truncated zip, ...
        raise InputError(f"{what}: cannot read {path} as a tensor saved with torch.save "
                         f"(read with weights_only=True): {_one_line(exc)}") from None
    if not isinstance(data, torch.Tensor):
        raise InputError(f"{what}: {path} holds a {type(data).__name__}; expected one tensor [N, ...] "
                         "of N inputs saved with torch.save")
    return data


def _split(data: torch.Tensor, batch_size: int, path: str, what: str) -> List[torch.Tensor]:
    if data.dim() == 0 or data.shape[0] == 0:
        raise InputError(f"{what}: {path} holds a tensor of shape {tuple(data.shape)}; expected [N, ...] "
                         "with N >= 1 inputs")
    return list(data.split(batch_size))


def _tokenized_lines(path: str, loaded: LoadedModel, batch_size: int, seq_len: int, progress: bool,
                     what: str) -> List[Dict[str, torch.Tensor]]:
    try:
        with open(path, encoding="utf-8") as handle:
            texts = [line.strip() for line in handle if line.strip()]
    except UnicodeDecodeError:
        raise InputError(f"{what}: {path} is neither UTF-8 text (one text per line) nor a tensor file") from None
    if not texts:
        raise InputError(f"{what}: {path} has no text (one text per line expected)")
    tokenizer = load_tokenizer(loaded)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Decoder tokenizers (GPT-2, Llama) have no pad token; the attention mask hides the padding.
        tokenizer.pad_token = tokenizer.eos_token
    from tqdm.auto import tqdm

    batches = []
    for start in tqdm(range(0, len(texts), batch_size), desc=f"tokenize {os.path.basename(path)}",
                      unit="batch", disable=not progress):
        encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                            max_length=seq_len, return_tensors="pt")
        batches.append(dict(encoded))
    return batches


def load_tokenizer(loaded: LoadedModel):
    """The tokenizer saved in a transformers model's folder."""
    if loaded.folder is None:
        raise InputError(f"text data needs a tokenizer, and {loaded.source} is not a transformers model "
                         "folder: give a tensor file instead")
    # Without any of these, transformers builds a tokenizer with an empty vocabulary (every word
    # becomes [UNK]) rather than failing.
    if not any(os.path.isfile(os.path.join(loaded.folder, name)) for name in _TOKENIZER_FILES):
        raise InputError(f"cannot load a tokenizer from {loaded.folder}: it has none of "
                         f"{', '.join(_TOKENIZER_FILES)} (save one there with tokenizer.save_pretrained)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(loaded.folder, local_files_only=True)
    except Exception as exc:  # missing vocab files raise OSError, ValueError, TypeError, ...
        raise InputError(f"cannot load a tokenizer from {loaded.folder}: {_one_line(exc)}") from None


def as_training_pairs(batches: List[Any]) -> List[tuple]:
    """Input batches as the (inputs, labels) pairs distillation trains on, without labels."""
    return [(batch, None) for batch in batches]
