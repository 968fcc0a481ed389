"""Drop-in sparse replacements for nn.Linear: the zeros already in a (pruned) weight become speed.

SparseLinear        any of the formats below, or "auto": the one expected to be fastest for this
                    layer, which may be the dense weight itself when sparse would be slower
Sparse24Linear      2:4 semi-structured (half the values, 2-bit positions)
BlockSparseLinear   block sparse (BSR) with a chosen block shape
SparseInt8Linear    sparse and int8 together: int8 codes with a per-output-channel scale, stored
                    in the unstructured (CSR) or 2:4 format, whichever the zeros fit, or, with
                    int8 activations (act_bits), in the sliced-ELL format of the W8A8 kernel

The weight is packed once, in from_dense(), into registered buffers, so state_dict() carries the
compressed form. Because the number of stored entries differs from weight to weight, loading a
state_dict replaces the buffers' shapes (and, through the saved extra state, the format), then
validates the result: a corrupt or inconsistent state_dict is refused with a clear error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..formats import (FLOAT_VALUE_DTYPES, BlockSparseWeight, SlicedEllInt8Weight, Sparse24Weight,
                       SparseCSRWeight, detect_pattern)
from ._frozen import FrozenLinearBase

FORMATS = ("csr", "2:4", "bsr", "sell", "dense")
_FORMAT_BUFFERS = {
    "csr": ("seg_ptr", "col_offsets", "values"),
    "2:4": ("values", "meta"),
    "bsr": ("block_row_ptr", "block_col_idx", "values"),
    "sell": ("block_step_ptr", "step_masks", "slice_ptr", "col_offsets", "values"),
    "dense": ("weight",),
}
_ALL_FORMAT_BUFFERS = tuple(sorted({name for names in _FORMAT_BUFFERS.values() for name in names}))

# The choice "auto" makes, from what `sparseq bench sparse` measured on a 2-core AVX2 machine
# (bench/results/sparse-cpu-epyc-zen3-2t.json, M=1..512): unstructured CSR beats dense fp32 at
# every M and shape from about 60% zeros (at 50% it loses at M >= 128 and on small layers); a 2:4
# weight runs 1.4-3x faster than dense at K=N=4096; BSR beats CSR when its blocks are this full.
CSR_MIN_SPARSITY = 0.6
BSR_MIN_FILL = 0.75
BSR_BLOCKS = ((1, 8), (4, 4), (8, 8), (16, 16))


@dataclass(frozen=True)
class FormatChoice:
    format: str
    block: Optional[tuple[int, int]]
    reason: str


def choose_format(weight: torch.Tensor, int8: bool = False) -> FormatChoice:
    """The format SparseLinear.from_dense(format="auto") uses for ``weight`` and why.

    2:4 when every group of 4 holds at most 2 nonzeros and at least ~1/3 of the entries are
    nonzero (sparser 2:4 weights go to CSR, which skips the zeros 2:4 stores); BSR when one of
    BSR_BLOCKS is at least BSR_MIN_FILL full and leaves out CSR_MIN_SPARSITY of the blocks; CSR
    from CSR_MIN_SPARSITY zeros; else the dense
    weight (int8=True never picks dense: SparseInt8Linear is sparse by request).
    """
    pattern = detect_pattern(weight, blocks=BSR_BLOCKS)
    sparsity = pattern["sparsity"]
    if pattern["is_2_4"] and 0.0 < sparsity <= 0.66:
        return FormatChoice("2:4", None, f"2:4 pattern, {sparsity:.0%} zeros")
    n, k = pattern["shape"]
    for candidate in pattern["blocks"]:  # fullest first
        bh, bw = candidate["block"]
        skipped = 1.0 - candidate["stored_blocks"] / (-(-n // bh) * -(-k // bw))
        if candidate["fill"] >= BSR_MIN_FILL and skipped >= CSR_MIN_SPARSITY:
            return FormatChoice("bsr", (bh, bw), f"{bh}x{bw} blocks {candidate['fill']:.0%} full, "
                                                 f"{skipped:.0%} of blocks empty")
    if sparsity >= CSR_MIN_SPARSITY or (int8 and sparsity > 0.0):
        return FormatChoice("csr", None, f"unstructured, {sparsity:.0%} zeros")
    if int8:
        return FormatChoice("csr", None, "no zeros (sparse int8 requested)")
    return FormatChoice("dense", None, f"only {sparsity:.0%} zeros: sparse kernels would be slower "
                                       f"than dense below {CSR_MIN_SPARSITY:.0%}")


def _check_linear(cls: type, linear: nn.Module) -> torch.Tensor:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{cls.__name__}.from_dense expects an nn.Linear, got {type(linear).__name__}")
    if isinstance(linear.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"{cls.__name__}.from_dense: the {type(linear).__name__} is not initialized "
                         "yet; run one forward pass first")
    return linear.weight.detach()


class SparseLinear(FrozenLinearBase):
    """nn.Linear with a sparse weight in one of FORMATS ("csr", "2:4", "bsr", "dense").

    Build it with from_dense(linear, format="auto"); the constructor makes an empty skeleton of
    the given format for load_state_dict. Same call signature as nn.Linear: any leading dims,
    float32 / bfloat16 / float16 input, output in the input's dtype.
    """

    _FP32_BUFFERS = ("w_scale", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: str = "csr",
                 block: Optional[tuple[int, int]] = None, int8: bool = False,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__(in_features, out_features, backend)
        self.format_reason = "built directly"
        empty = torch.zeros(out_features, in_features, dtype=dtype, device=device)
        self._set_weight(empty, format, block, int8)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device)
                             if bias else None)

    # -- building -------------------------------------------------------------------------------

    def _set_weight(self, weight: torch.Tensor, format: str, block: Optional[tuple[int, int]],
                    int8: bool) -> None:
        """Pack ``weight`` [N, K] into ``format`` and make the buffers hold it."""
        if format not in FORMATS:
            raise ValueError(f"unknown sparse format {format!r}; expected one of {FORMATS} or 'auto'")
        if int8 and format == "dense":
            raise ValueError("int8 sparse layers store a sparse format; use sparseq.nn.Int8Linear for dense int8")
        if format == "sell" and not int8:
            raise ValueError("format='sell' holds int8 codes for the W8A8 kernel; use "
                             "SparseInt8Linear.from_dense(linear, act_bits=8)")
        if format == "bsr" and block is None:
            raise ValueError("format='bsr' needs block=(bh, bw)")
        if format != "bsr" and block is not None:
            raise ValueError(f"block= only applies to format='bsr', not {format!r}")
        dtype = None if int8 else (weight.dtype if weight.dtype in FLOAT_VALUE_DTYPES else torch.float32)
        # A meta weight is a placeholder without values (a layer built empty on the meta device,
        # as sparseq.load does, for load_state_dict(assign=True) to fill, which takes its buffer
        # shapes from the file): packing must read values, so pack a one-block-high all-zero
        # slice of it on the CPU (never a dense weight) and keep the buffers on meta.
        rows = block[0] if format == "bsr" else 1
        source = torch.zeros((rows, weight.shape[1]), dtype=weight.dtype, device="cpu") if weight.is_meta else weight
        if format == "csr":
            packed = SparseCSRWeight.pack(source, dtype=dtype, int8=int8)
        elif format == "2:4":
            packed = Sparse24Weight.pack(source, dtype=dtype, int8=int8)
        elif format == "bsr":
            packed = BlockSparseWeight.pack(source, tuple(block), dtype=dtype, int8=int8)
        elif format == "sell":
            packed = SlicedEllInt8Weight.pack(source)
        else:
            packed = None
        for name in _ALL_FORMAT_BUFFERS:
            self._buffers.pop(name, None)
        self.format = format
        self.block = None if block is None else tuple(int(b) for b in block)
        self.int8 = int8
        if packed is None:
            self.register_buffer("weight", weight.detach().to(dtype).clone())
            self.register_buffer("w_scale", None)
            return
        for name in _FORMAT_BUFFERS[format]:
            self.register_buffer(name, getattr(packed, name).to(weight.device))
        self.register_buffer("w_scale", None if packed.scale is None else packed.scale.to(weight.device))

    @classmethod
    def from_dense(cls, linear: nn.Linear, format: str = "auto", block: Optional[tuple[int, int]] = None,
                   backend: Optional[str] = None) -> "SparseLinear":
        """Pack ``linear``'s weight, zeros skipped, in ``format`` ("auto" picks with
        choose_format: the fastest expected, possibly "dense")."""
        return cls._build(linear, format, block, int8=False, backend=backend)

    @classmethod
    def _build(cls, linear: nn.Linear, format: str, block, int8: bool, backend):
        weight = _check_linear(cls, linear)
        reason = "requested"
        if format == "auto":
            if block is not None:
                raise ValueError("block= goes with format='bsr', not format='auto'")
            choice = choose_format(weight, int8=int8)
            format, block, reason = choice.format, choice.block, choice.reason
        # The subclasses' constructors fix the format; build through the base one, then pack.
        layer = cls.__new__(cls)
        SparseLinear.__init__(layer, linear.in_features, linear.out_features, bias=linear.bias is not None,
                              format="dense", device=weight.device, backend=backend)
        layer._set_weight(weight, format, block, int8)
        layer.format_reason = reason
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    # -- what the layer holds -------------------------------------------------------------------

    def weight_format(self):
        """The packed weight as its formats.py dataclass (validated), or None for "dense"."""
        n, k = self.out_features, self.in_features
        if self.format == "csr":
            return SparseCSRWeight(self.seg_ptr, self.col_offsets, self.values, self.w_scale, k, n)
        if self.format == "2:4":
            return Sparse24Weight(self.values, self.meta, self.w_scale, k, n)
        if self.format == "bsr":
            return BlockSparseWeight(self.block_row_ptr, self.block_col_idx, self.values, self.w_scale,
                                     self.block, k, n)
        if self.format == "sell":
            return SlicedEllInt8Weight(self.block_step_ptr, self.step_masks, self.slice_ptr, self.col_offsets,
                                       self.values, self.w_scale, k, n)
        return None

    def dense_weight(self) -> torch.Tensor:
        """float32 [N, K]: exactly the (masked, dequantized when int8) weight the layer uses."""
        packed = self.weight_format()
        return self.weight.float() if packed is None else packed.unpack()

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (bias excluded)."""
        packed = self.weight_format()
        return self.weight.numel() * self.weight.element_size() if packed is None else packed.nbytes

    @property
    def sparsity(self) -> float:
        return float((self.dense_weight() == 0).float().mean())

    def to_dense(self) -> nn.Linear:
        """An nn.Linear holding exactly the weight this layer computes with (and the bias)."""
        values = self.weight if self.format == "dense" else self.values
        dtype = values.dtype if values.dtype in FLOAT_VALUE_DTYPES else torch.float32
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=values.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # -- compute --------------------------------------------------------------------------------

    def _linear_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        # One dict for the buffers instead of nn.Module.__getattr__ per name: on small layers the
        # Python around the kernel costs as much as the kernel. The buffers were validated when
        # built or loaded (weight_format()), hence weight_checked=True.
        b, k, backend = self._buffers, self.in_features, self.backend
        if self.format == "csr":
            return ops.sparse_csr_linear(x2d, b["seg_ptr"], b["col_offsets"], b["values"], b["w_scale"], b["bias"],
                                         in_features=k, backend=backend, weight_checked=True)
        if self.format == "2:4":
            return ops.sparse24_linear(x2d, b["values"], b["meta"], b["w_scale"], b["bias"],
                                       in_features=k, backend=backend, weight_checked=True)
        if self.format == "bsr":
            return ops.bsr_linear(x2d, b["block_row_ptr"], b["block_col_idx"], b["values"], b["w_scale"],
                                  b["bias"], out_features=self.out_features, in_features=k,
                                  backend=backend, indices_validated=True, weight_checked=True)
        bias = None if b["bias"] is None else b["bias"].to(x2d.dtype)
        return F.linear(x2d, b["weight"].to(x2d.dtype), bias)

    # -- state_dict -----------------------------------------------------------------------------

    def get_extra_state(self) -> dict:
        return {"format": self.format, "block": self.block, "int8": self.int8}

    def set_extra_state(self, state) -> None:
        # Applied in _load_from_state_dict, before the buffers: the format decides which exist.
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            if (not isinstance(extra, dict) or extra.get("format") not in FORMATS
                    or not isinstance(extra.get("int8"), bool)):
                error_msgs.append(f"{prefix}_extra_state does not describe a sparse format: {extra!r}")
                return
            block = extra.get("block")
            device = next(t.device for t in self._buffers.values() if t is not None)
            empty = torch.zeros(self.out_features, self.in_features, device=device)
            try:
                self._set_weight(empty, extra["format"], None if block is None else tuple(block), extra["int8"])
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"{prefix}_extra_state: {exc}")
                return
        # The incoming tensors decide the shapes (their nnz); the default loader then copies.
        for name in _FORMAT_BUFFERS[self.format] + ("w_scale",):
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, torch.Tensor) and self._buffers.get(name) is not None:
                self._buffers[name] = torch.empty_like(incoming, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        try:
            self.weight_format()
        except (ValueError, TypeError) as exc:
            error_msgs.append(f"{prefix[:-1] or type(self).__name__}: the loaded {self.format} weight is "
                              f"inconsistent: {exc}")

    # -- repr -----------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        values = self.weight if self.format == "dense" else self.values
        block = f" {self.block[0]}x{self.block[1]}" if self.format == "bsr" else ""
        dense_bytes = self.in_features * self.out_features * 4
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}{block} ({self.format_reason}), "
                f"values={'int8' if self.int8 else str(values.dtype).replace('torch.', '')}, "
                f"backend={self.backend or 'auto'}, "
                f"bytes={self.nbytes} ({self.nbytes / dense_bytes:.1%} of dense fp32)")


class Sparse24Linear(SparseLinear):
    """2:4 semi-structured sparse linear; from_dense refuses a weight that is not 2:4, naming
    the first group of 4 columns holding more than 2 nonzeros."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, int8: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, backend: Optional[str] = None) -> None:
        super().__init__(in_features, out_features, bias=bias, format="2:4", int8=int8, dtype=dtype,
                         device=device, backend=backend)

    @classmethod
    def from_dense(cls, linear: nn.Linear, backend: Optional[str] = None) -> "Sparse24Linear":
        return cls._build(linear, "2:4", None, int8=False, backend=backend)


class BlockSparseLinear(SparseLinear):
    """Block sparse (BSR) linear: only the blocks holding a nonzero are stored and computed."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 block: tuple[int, int] = (4, 4), int8: bool = False, dtype: torch.dtype = torch.float32,
                 device=None, backend: Optional[str] = None) -> None:
        super().__init__(in_features, out_features, bias=bias, format="bsr", block=block, int8=int8,
                         dtype=dtype, device=device, backend=backend)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block: Optional[tuple[int, int]] = None,
                   backend: Optional[str] = None) -> "BlockSparseLinear":
        """block=None picks the fullest of BSR_BLOCKS for this weight's zeros."""
        if block is None:
            block = detect_pattern(_check_linear(cls, linear), blocks=BSR_BLOCKS)["blocks"][0]["block"]
        return cls._build(linear, "bsr", block, int8=False, backend=backend)


_warned_slow_sell = False


def _warn_slow_sell_once() -> None:
    global _warned_slow_sell
    if not _warned_slow_sell:
        _warned_slow_sell = True
        logging.getLogger("sparseq").warning(
            "sparseq: this CPU has no AVX-512 VBMI2 + VNNI (or no compiled kernels), so SparseInt8Linear's "
            "sliced-ELL W8A8 layers (act_bits set, not 2:4) run the AVX2 kernel here (a portable loop "
            "without AVX2 or the extension); act_bits=None (float activations) is faster on this CPU")


class SparseInt8Linear(SparseLinear):
    """Sparse and int8 together: symmetric per-output-channel int8 codes of the nonzeros.

    format="auto" detects the pattern (2:4, well-filled blocks, else unstructured CSR).
    act_bits=None (default) keeps activations in float and dequantizes the codes on the fly
    (weight-only int8: the more accurate, and the fastest on CPUs without AVX-512 VBMI2 + VNNI).
    act_bits=8 or 7 quantizes activations per row at run time (W8A8), on the 2:4 format or on
    "sell" (SlicedEllInt8Weight, any pattern). format="auto" then picks sell, except for a 2:4
    weight where sell's CPU kernel does not run (2:4 has GPU sparse tensor cores). Sell's CPU
    kernel looks activations up with byte permutes instead of gathers: 2-3.6x torch's dense
    dynamic int8 at 90% zeros, M <= 16, on an AVX-512 VBMI2 + VNNI CPU (Ice Lake or Zen 4 and
    later). AVX2 CPUs run an AVX2 kernel for it (byte shuffles, 4 per lookup), about as fast as
    float activations at M=1 and slower from M=16; CPUs without AVX2 a portable loop.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: str = "csr",
                 block: Optional[tuple[int, int]] = None, act_bits: Optional[int] = None, device=None,
                 backend: Optional[str] = None) -> None:
        super().__init__(in_features, out_features, bias=bias, format=format, block=block, int8=True,
                         device=device, backend=backend)
        self.act_bits = act_bits
        self._check_act_bits()

    def _check_act_bits(self) -> None:
        if self.act_bits not in (None, 7, 8):
            raise ValueError(f"act_bits must be None (float activations), 8 or 7, got {self.act_bits!r}")
        if self.act_bits is not None and self.format not in ("2:4", "sell"):
            raise ValueError(f"act_bits={self.act_bits} (int8 activations) needs the 2:4 or sell format; this "
                             f"weight is stored as {self.format} (format='auto' picks one of them)")
        if self.act_bits is None and self.format == "sell":
            raise ValueError("format='sell' is for int8 activations: pass act_bits=8 or 7")

    @classmethod
    def from_dense(cls, linear: nn.Linear, format: str = "auto", block: Optional[tuple[int, int]] = None,
                   act_bits: Optional[int] = None, backend: Optional[str] = None) -> "SparseInt8Linear":
        reason = None
        if format == "auto" and act_bits is not None:
            if block is not None:
                raise ValueError("block= goes with format='bsr', not format='auto'")
            weight = _check_linear(cls, linear)
            choice = choose_format(weight, int8=True)
            format, block, reason = choice.format, choice.block, choice.reason
            # The W8A8 kernels take 2:4 or sliced ELL. 2:4 has GPU sparse tensor cores, but on a CPU
            # with the sliced-ELL kernel that one is faster (2:4 W8A8 there is AVX2 only).
            on_sell_cpu = weight.device.type == "cpu" and ops.cpu_has_sell_kernel()
            if format != "2:4" or on_sell_cpu:
                format, block, reason = "sell", None, f"{reason}; int8 activations: sliced ELL"
        layer = cls._build(linear, format, block, int8=True, backend=backend)
        if reason is not None:
            layer.format_reason = reason
        layer.act_bits = act_bits  # _build skips this class's constructor
        layer._check_act_bits()
        if layer.format == "sell" and layer.values.device.type == "cpu" and not ops.cpu_has_sell_kernel():
            _warn_slow_sell_once()
        return layer

    def _linear_2d(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return super()._linear_2d(x2d)
        b = self._buffers
        act_qmax = 127 if self.act_bits == 8 else 63
        if self.format == "sell":
            return ops.sparse_sell_int8_linear(x2d, b["block_step_ptr"], b["step_masks"], b["slice_ptr"],
                                               b["col_offsets"], b["values"], b["w_scale"], b["bias"], act_qmax,
                                               in_features=self.in_features, backend=self.backend,
                                               weight_checked=True)
        return ops.sparse24_int8_linear(x2d, b["values"], b["meta"], b["w_scale"], b["bias"], act_qmax=act_qmax,
                                        in_features=self.in_features, backend=self.backend, weight_checked=True)

    def get_extra_state(self) -> dict:
        return dict(super().get_extra_state(), act_bits=self.act_bits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict) and extra.get("act_bits", None) in (None, 7, 8):
            self.act_bits = extra.get("act_bits")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act_bits={self.act_bits}"
