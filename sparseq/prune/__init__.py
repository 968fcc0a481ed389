"""Pruning passes: zero weights by a criterion (magnitude, Wanda, SparseGPT, ...) in patterns the
sparse kernels run fast.

Every pass works in place on any nn.Module, zeroes weights with plain zeros (no
torch.nn.utils.prune reparametrisation, so sparseq.sparsify_ and sparseq.quant.quantize_ consume
the result as is) and returns a Masks object (.attach(optimizer), .detach(), .apply(),
.report(), .sparsity()).
"""
from .gradual import GradualPruner
from .magnitude import magnitude
from .masks import Masks, prunable_layers
from .patterns import Pattern, mask_from_scores, parse_pattern
from .regularizers import group_lasso_penalty, l1_penalty, soft_threshold
from .sparsegpt import sparsegpt
from .wanda import wanda

__all__ = ["magnitude", "wanda", "sparsegpt", "GradualPruner", "soft_threshold", "l1_penalty",
           "group_lasso_penalty", "Masks", "Pattern", "mask_from_scores", "parse_pattern",
           "prunable_layers"]
