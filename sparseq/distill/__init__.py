"""Knowledge distillation from a dense teacher into a compressed student."""
from .distiller import OUTPUT_KINDS, Distiller
from .losses import attention_loss, hard_label_loss, kd_loss, representation_loss

__all__ = ["Distiller", "OUTPUT_KINDS", "attention_loss", "hard_label_loss", "kd_loss",
           "representation_loss"]
