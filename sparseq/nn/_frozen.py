"""What every sparseq inference layer shares: nn.Linear's call signature over a frozen,
packed weight.

Subclasses define _linear_2d(x2d) (the op call on a contiguous [M, in_features] input, passing
weight_checked=True: the buffers were validated when built or loaded) and dense_weight() (the float32 [N, K] weight the layer computes with, for gradients and to_dense).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import ops


class FrozenLinearBase(nn.Module):
    # Kept in float32 whatever dtype the model is cast to (see _apply): the kernels read fp32
    # scales, and a bf16 round trip would lose precision silently.
    _FP32_BUFFERS: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, backend: Optional[str] = None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got "
                             f"{in_features} and {out_features}")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {ops.BACKENDS}")
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend

    # The dense module a layer of this kind replaces (sparseq.load puts one in its place).
    DENSE_CLASS = nn.Linear

    def dense_shape(self) -> tuple:
        """The shape of the nn.Linear weight this layer stands for."""
        return (self.out_features, self.in_features)

    def _linear_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Layers whose kernel fuses an output activation (Int8Linear(activation="gelu")) split it off
    # when gradients flow: the straight-through gradient below covers the linear part only.
    def _pre_activation_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        return self._linear_2d(x2d)

    def _output_activation(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        shape = x.shape
        # Checked here, before flattening: a reshape would silently regroup a wrong last dim.
        if not shape or shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects in_features={self.in_features} in the "
                             f"last dimension, got input of shape {tuple(shape)}")
        # A 2-D contiguous x (the common [batch, features]) goes to the op as is: on small layers
        # the reshapes cost as much as the kernel.
        flat = len(shape) == 2 and x.is_contiguous()
        x2d = x if flat else x.reshape(-1, self.in_features).contiguous()
        if x2d.requires_grad and torch.is_grad_enabled():
            out = self._output_activation(_GradThroughFrozenWeight.apply(x2d, self))
        else:
            out = self._linear_2d(x2d)
        return out if flat else out.reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every floating buffer; these follow device moves only.
        originals = {name: self._buffers[name] for name in self._FP32_BUFFERS
                     if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in originals.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self


class _GradThroughFrozenWeight(torch.autograd.Function):
    """Gradient with respect to the input through the frozen weight: grad_x = grad_out @ W, W the
    layer's dense_weight(). Exact for float-activation layers; for W8A8 the activation rounding is
    passed straight through (its true derivative is zero almost everywhere, which would silently
    stop training of anything upstream, e.g. adapters). The weight and bias get no gradient."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, layer: FrozenLinearBase) -> torch.Tensor:
        ctx.layer = layer
        return layer._pre_activation_2d(x2d)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.layer.dense_weight()
        return (grad_out.float() @ weight).to(grad_out.dtype), None
