"""The loss terms of knowledge distillation, as plain functions on tensors.

Every function computes in float32 (whatever the models' dtype) and returns a scalar tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: Optional[torch.Tensor] = None, temperature: float = 4.0,
            alpha: float = 0.5) -> torch.Tensor:
    """Hinton et al. (2015) knowledge-distillation loss on class logits [..., C].

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels),
    the KL summed over classes and averaged over rows (every position of the leading dims is a
    row: "batchmean"); T^2 keeps the soft term's gradients on the scale of the hard term's as T
    changes. labels: class indices of shape logits.shape[:-1] (-100 = ignore, as in
    F.cross_entropy) or class probabilities of the logits' shape; None gives the soft term alone
    (not scaled by alpha then: there is nothing to weigh it against).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits of shape {tuple(student_logits.shape)} do not match "
                         f"teacher logits of shape {tuple(teacher_logits.shape)}")
    classes = student_logits.shape[-1]
    student_rows = student_logits.float().reshape(-1, classes)
    teacher_rows = teacher_logits.float().reshape(-1, classes)
    soft = F.kl_div(F.log_softmax(student_rows / temperature, dim=-1),
                    F.log_softmax(teacher_rows / temperature, dim=-1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    if labels is None:
        return soft
    return alpha * soft + (1 - alpha) * hard_label_loss(student_logits, labels)


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [..., C] against class indices (shape logits.shape[:-1]) or class
    probabilities (the logits' shape); a clear error for labels of any other shape."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor (or None), got {type(labels).__name__}")
    classes = logits.shape[-1]
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise ValueError(f"soft (float) labels must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(labels.shape)}")
        return F.cross_entropy(logits.float().reshape(-1, classes), labels.float().reshape(-1, classes))
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"class-index labels must have shape {tuple(logits.shape[:-1])} (the logits' "
                         f"{tuple(logits.shape)} without the class dim), got {tuple(labels.shape)}")
    return F.cross_entropy(logits.float().reshape(-1, classes), labels.reshape(-1).long())


def representation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE + (1 - cosine similarity) between two representations of the same shape [..., H].

    The MSE matches magnitudes; the cosine term (averaged over rows, each row a vector along the
    last dim) matches directions, which is what a sentence encoder's embeddings are compared by.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student output of shape {tuple(student.shape)} does not match teacher "
                         f"output of shape {tuple(teacher.shape)}")
    student, teacher = student.float(), teacher.float()
    cosine = F.cosine_similarity(student, teacher, dim=-1)
    return F.mse_loss(student, teacher) + (1 - cosine).mean()


def attention_loss(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between attention probabilities [B, heads, Tq, Tk], summed over
    the keys and averaged over every (batch, head, query) row (the attention transfer of
    MiniLM, Wang et al. 2020)."""
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(f"student attention maps of shape {tuple(student_probs.shape)} do not match "
                         f"teacher attention maps of shape {tuple(teacher_probs.shape)} (batch, heads, "
                         "queries, keys must agree)")
    keys = student_probs.shape[-1]
    teacher_rows = teacher_probs.float().reshape(-1, keys)
    # Masked keys have probability 0 in both maps: clamp so 0 * log(0) stays 0 rather than NaN.
    student_log = student_probs.float().reshape(-1, keys).clamp_min(1e-12).log()
    return F.kl_div(student_log, teacher_rows, reduction="batchmean")
