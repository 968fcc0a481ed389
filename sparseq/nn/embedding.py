"""QuantizedEmbedding: an nn.Embedding whose table is stored as 8- or 4-bit codes.

A lookup reads only the rows it needs, so a quantized table costs nothing in speed; what it buys
is size: in a small transformer the token embedding is often the largest tensor of the model
(all-MiniLM-L6-v2: 47 MB of its 91 MB fp32 checkpoint). Weight-only, for inference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_BITS = (8, 4)
# A 4-bit code needs a scale per small group of a row to stay accurate (all-MiniLM-L6-v2, mean
# cosine of sentence embeddings with only the token table quantized: 0.9928 with one scale per
# row, 0.9985 per 32 values); 8 bits need one per row (0.99999).
_DEFAULT_GROUP = {8: None, 4: 32}


class QuantizedEmbedding(nn.Module):
    """Drop-in nn.Embedding (forward only) holding symmetric int codes of its table.

    Each row is cut into groups of ``group_size`` consecutive values (default: the whole row for
    8 bits, 32 for 4 bits); a group's values are round(w / s) with s = max|w| / qmax (qmax 127 or
    7), kept as int8 (8 bits) or two 4-bit codes per byte (4 bits), and s in float16. A lookup
    gathers the rows' codes and scales and multiplies them out in ``out_dtype``.
    """

    DENSE_CLASS = nn.Embedding

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, group_size: Optional[int] = None,
                 padding_idx: Optional[int] = None, out_dtype: torch.dtype = torch.float32,
                 device=None) -> None:
        super().__init__()
        if bits not in _BITS:
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        if group_size is None:
            group_size = _DEFAULT_GROUP[bits] or embedding_dim
        if not (isinstance(group_size, int) and group_size > 0 and embedding_dim % group_size == 0):
            raise ValueError(f"group_size must be a positive divisor of embedding_dim={embedding_dim}, got {group_size!r}")
        if bits == 4 and group_size % 2:
            raise ValueError(f"4-bit codes are stored two per byte: group_size must be even, got {group_size}")
        if not out_dtype.is_floating_point:
            raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.bits = bits
        self.group_size = group_size
        self.padding_idx = padding_idx
        self.out_dtype = out_dtype
        code_width = embedding_dim if bits == 8 else embedding_dim // 2
        self.register_buffer("codes", torch.zeros(num_embeddings, code_width, device=device,
                                                  dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.ones(num_embeddings, embedding_dim // group_size, device=device,
                                                  dtype=torch.float16))

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, bits: int = 8, group_size: Optional[int] = None) -> "QuantizedEmbedding":
        """Quantize ``embedding``'s table (its lookups then come out in the table's dtype)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"QuantizedEmbedding.from_dense expects an nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None:
            raise ValueError("an nn.Embedding with max_norm renormalises its table on lookup; a quantized "
                             "table cannot: leave it out")
        weight = embedding.weight.detach()
        if not torch.isfinite(weight).all():
            raise ValueError("the embedding table holds NaN or Inf; it cannot be quantized")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, bits=bits, group_size=group_size,
                    padding_idx=embedding.padding_idx, out_dtype=weight.dtype, device=weight.device)
        qmax = 2 ** (bits - 1) - 1
        groups = weight.float().reshape(weight.shape[0], -1, layer.group_size)
        # float16 scales (the clamp keeps an all-zero group's scale positive; a code that float16
        # rounding of its scale pushes past qmax is clamped).
        scales = (groups.abs().amax(-1) / qmax).clamp(min=2.0 ** -14).to(torch.float16)
        codes = torch.round(groups / scales.float().unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8)
        codes = codes.reshape(weight.shape)
        layer.scales.copy_(scales)
        layer.codes.copy_(codes if bits == 8 else _pack_nibbles(codes))
        return layer

    def _values(self, codes: torch.Tensor) -> torch.Tensor:
        """Signed codes [..., embedding_dim] from stored codes."""
        if self.bits == 8:
            return codes
        low = (codes & 15).to(torch.int8) - 8
        high = (codes >> 4).to(torch.int8) - 8
        return torch.stack((low, high), dim=-1).flatten(-2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"QuantizedEmbedding expects int64 or int32 indices, got {input.dtype}")
        values = self._values(F.embedding(input, self.codes))
        scales = F.embedding(input, self.scales)
        groups = values.reshape(*values.shape[:-1], -1, self.group_size).to(self.out_dtype)
        return (groups * scales.to(self.out_dtype).unsqueeze(-1)).flatten(-2)

    def to_dense(self) -> nn.Embedding:
        """The nn.Embedding whose table is exactly what the codes stand for."""
        rows = torch.arange(self.num_embeddings, device=self.codes.device)
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                 device=self.codes.device, dtype=self.out_dtype)
        with torch.no_grad():
            embedding.weight.copy_(self(rows))
        return embedding

    def dense_shape(self) -> tuple:
        """The shape of the nn.Embedding table this layer stands for."""
        return (self.num_embeddings, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would cast the float16 scales: they follow device moves only,
        # and lookups come out in the dtype the rest of the model is cast to.
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype
        scales = self._buffers["scales"]
        super()._apply(fn, recurse)
        self._buffers["scales"] = scales.to(self._buffers["scales"].device)
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + f", out_dtype={str(self.out_dtype).replace('torch.', '')}")


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes [rows, dim] (in [-7, 7]) -> [rows, dim / 2] bytes: code + 8, two per
    byte, the even element in the low nibble."""
    offset = (codes.to(torch.int16) + 8).to(torch.uint8)
    return offset[:, 0::2] | (offset[:, 1::2] << 4)
