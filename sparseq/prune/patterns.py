"""Sparsity patterns and the masks that keep the highest-scoring weights in them.

A pattern is written as
  "unstructured"   any weights may be zeroed;
  "n:m"            e.g. "2:4", "4:8": in every group of m consecutive weights along the input
                   dimension of a row, n are kept (the layout sparse tensor cores and sparseq's
                   2:4 kernels run fast); the sparsity is 1 - n/m;
  (bh, bw)         whole bh x bw blocks are kept or zeroed (the BSR kernels' layout).

Every weight is seen as a matrix [out, in]: a Conv2d weight [out, in, kh, kw] as
[out, in*kh*kw], so its input dimension runs over (in channel, kh, kw) in that order.

Masks are boolean tensors shaped like the weight: True where a weight is kept, False where it
is zeroed. Scores rank weights (higher = more important); ties are broken by position (the
earlier weight, in row-major order, is pruned first), so the same scores always give the same
mask.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

SCOPES = ("global", "layer")


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern: ``kind`` is "unstructured", "n:m" or "block"; ``n``, ``m`` for
    N:M; ``block`` = (bh, bw) for block patterns."""

    kind: str
    n: int = 0
    m: int = 0
    block: Tuple[int, int] = (1, 1)

    @property
    def fixed_sparsity(self) -> Optional[float]:
        """The sparsity an N:M pattern implies (1 - n/m); None for the others."""
        return 1.0 - self.n / self.m if self.kind == "n:m" else None

    def __str__(self) -> str:
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"{self.block[0]}x{self.block[1]} blocks"
        return "unstructured"


_PATTERN_HELP = '"unstructured", an "n:m" string such as "2:4" or "4:8", or a (bh, bw) block tuple'


def parse_pattern(pattern: Any) -> Pattern:
    """The Pattern for ``pattern`` ("unstructured", "n:m" with 0 < n < m, or a (bh, bw) tuple of
    positive ints). Unknown strings and malformed tuples raise ValueError, other types TypeError."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        text = pattern.strip().lower()
        if text == "unstructured":
            return Pattern("unstructured")
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise ValueError(f"N:M pattern {pattern!r} needs 0 < N < M (keep N of every M)")
            return Pattern("n:m", n=n, m=m)
        raise ValueError(f"unknown sparsity pattern {pattern!r}; expected {_PATTERN_HELP}")
    if isinstance(pattern, (tuple, list)):
        if (len(pattern) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pattern)
                or min(pattern) < 1):
            raise ValueError(f"a block pattern must be two positive ints (bh, bw), got {pattern!r}")
        return Pattern("block", block=(int(pattern[0]), int(pattern[1])))
    raise TypeError(f"a sparsity pattern must be {_PATTERN_HELP}; got {type(pattern).__name__}")


def check_sparsity(sparsity: Any, pattern: Pattern) -> float:
    """``sparsity`` as a float in [0, 1), checked against ``pattern``: an N:M pattern fixes it
    (None is accepted and means 1 - n/m; any other value must equal 1 - n/m); the other patterns
    need it."""
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))):
        raise TypeError(f"sparsity must be a number in [0, 1), got {type(sparsity).__name__}")
    if pattern.kind == "n:m":
        implied = pattern.fixed_sparsity
        if sparsity is not None and not math.isclose(float(sparsity), implied, abs_tol=1e-9):
            raise ValueError(f"pattern {pattern} fixes the sparsity at {implied:g}; got sparsity="
                             f"{sparsity!r} (pass None or {implied:g})")
        return implied
    if sparsity is None:
        raise ValueError(f"a sparsity in [0, 1) is required for pattern {pattern}")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:  # also false for NaN
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of weights zeroed), got {sparsity!r}")
    return sparsity


def check_scope(scope: Any) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` seen as [out, in]: a conv weight [out, in, kh, kw] as [out, in*kh*kw]."""
    if tensor.dim() < 2:
        raise ValueError(f"a prunable weight has at least 2 dimensions, got shape {tuple(tensor.shape)}")
    return tensor.reshape(tensor.shape[0], -1)


def check_fits(pattern: Pattern, shape: torch.Size | Tuple[int, ...], name: str) -> None:
    """Raise ValueError naming layer ``name`` when its weight (of ``shape``) cannot take
    ``pattern``: an N:M whose M does not divide the input dimension, a block larger than the
    weight."""
    rows, cols = shape[0], math.prod(shape[1:])
    if pattern.kind == "n:m" and cols % pattern.m:
        raise ValueError(f"layer {name!r}: pattern {pattern} needs the input dimension to be a "
                         f"multiple of {pattern.m}, but the weight {tuple(shape)} has {cols} inputs")
    if pattern.kind == "block" and (pattern.block[0] > rows or pattern.block[1] > cols):
        raise ValueError(f"layer {name!r}: block {pattern.block} is larger than the weight "
                         f"[{rows}, {cols}]")


def count_pruned(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights a sparsity zeroes: the nearest integer, halves rounded up."""
    return min(numel, int(math.floor(sparsity * numel + 0.5)))


def prune_lowest(scores: torch.Tensor, per_row: int) -> torch.Tensor:
    """The keep-mask of a 2-D ``scores`` that zeroes the ``per_row`` lowest of every row (ties:
    the earlier position first)."""
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if per_row > 0:
        order = torch.argsort(scores, dim=1, stable=True)
        keep.scatter_(1, order[:, :per_row], False)
    return keep


def _block_scores(matrix: torch.Tensor, block: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-block mean score and element count of a [rows, cols] score matrix; edge blocks that
    the weight only partly covers average over the elements they have."""
    bh, bw = block
    rows, cols = matrix.shape
    pad_rows, pad_cols = -rows % bh, -cols % bw
    padded = torch.nn.functional.pad(matrix.float(), (0, pad_cols, 0, pad_rows))
    present = torch.nn.functional.pad(torch.ones_like(matrix, dtype=torch.float32),
                                      (0, pad_cols, 0, pad_rows))
    grid = (padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
    sums = padded.reshape(grid).sum(dim=(1, 3))
    counts = present.reshape(grid).sum(dim=(1, 3))
    return sums / counts, counts


def _expand_blocks(keep_blocks: torch.Tensor, block: Tuple[int, int], shape: Tuple[int, int]) -> torch.Tensor:
    bh, bw = block
    full = keep_blocks.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1)
    return full[:shape[0], :shape[1]]


def _prune_blocks(scores: torch.Tensor, counts: torch.Tensor, target: int) -> torch.Tensor:
    """Keep-mask over 1-D block ``scores``: the lowest blocks zeroed, as many as bring the number
    of zeroed elements (``counts`` per block) nearest to ``target`` (fewer on a tie)."""
    order = torch.argsort(scores, stable=True)
    zeroed = torch.cat([counts.new_zeros(1), torch.cumsum(counts[order].double(), 0)])
    how_many = int(torch.argmin((zeroed - target).abs()))  # argmin returns the first minimum
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    keep[order[:how_many]] = False
    return keep


def block_mask(scores: torch.Tensor, block: Tuple[int, int], target: int) -> torch.Tensor:
    """The keep-mask of a 2-D ``scores`` that zeroes whole (bh, bw) blocks, lowest mean score
    first, as many as bring the number of zeros nearest to ``target``."""
    block_scores, counts = _block_scores(scores, block)
    keep_blocks = _prune_blocks(block_scores.flatten(), counts.flatten(), target)
    return _expand_blocks(keep_blocks.reshape(block_scores.shape), block, scores.shape)


def mask_from_scores(scores: torch.Tensor, sparsity: Optional[float], pattern: Any = "unstructured",
                     name: str = "weight", per_row: bool = False) -> torch.Tensor:
    """The keep-mask (True = kept) of one weight's ``scores`` that zeroes the lowest-scoring
    weights in ``pattern`` (a string / tuple / Pattern, see the module docstring).

    unstructured: exactly count_pruned(sparsity, numel) zeros; with ``per_row=True``
      count_pruned(sparsity, in) in every row (Wanda's comparison group).
    n:m: the m - n lowest of every group of m along the input dimension; ``sparsity`` may be None
      or must equal 1 - n/m; an input dimension not divisible by m is a ValueError naming ``name``.
    (bh, bw): blocks are scored by the mean score of their elements (so a ragged edge block,
      which the weight only partly covers, competes on the same footing as a full one), and the
      lowest blocks are zeroed whole: as many as bring the number of zeros nearest to
      count_pruned(sparsity, numel) (exact when the blocks tile the weight and
      sparsity * number of blocks is an integer). ``per_row`` does not apply.
    ``scores`` of more than 2 dimensions (conv weights) are seen as [out, in*kh*kw].
    """
    pattern = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, pattern)
    check_fits(pattern, scores.shape, name)
    matrix = as_matrix(scores.detach())
    if pattern.kind == "n:m":
        keep = prune_lowest(matrix.reshape(-1, pattern.m), pattern.m - pattern.n)
    elif pattern.kind == "block":
        keep = block_mask(matrix, pattern.block, count_pruned(sparsity, matrix.numel()))
    elif per_row:
        keep = prune_lowest(matrix, count_pruned(sparsity, matrix.shape[1]))
    else:
        keep = prune_lowest(matrix.reshape(1, -1), count_pruned(sparsity, matrix.numel()))
    return keep.reshape(scores.shape)


def global_masks_from_scores(scores: Mapping[str, torch.Tensor], sparsity: Optional[float],
                             pattern: Any = "unstructured") -> Dict[str, torch.Tensor]:
    """Keep-masks for several layers ranked together: the lowest scores across all of them are
    zeroed, count_pruned(sparsity, total weights) in all (blocks: the lowest-mean blocks of every
    layer together, as in mask_from_scores). Scores must be comparable across layers (e.g. |W|).

    An N:M pattern constrains each group on its own, so its global masks are its per-layer ones.
    """
    pattern = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, pattern)
    for name, layer_scores in scores.items():
        check_fits(pattern, layer_scores.shape, name)
    if pattern.kind == "n:m":
        return {name: mask_from_scores(s, sparsity, pattern, name) for name, s in scores.items()}
    # Ranked together on the CPU: layers may live on different devices.
    if pattern.kind == "block":
        per_layer = {name: _block_scores(as_matrix(s.detach()).cpu(), pattern.block)
                     for name, s in scores.items()}
        flat_scores = torch.cat([block_scores.flatten() for block_scores, _ in per_layer.values()])
        flat_counts = torch.cat([counts.flatten() for _, counts in per_layer.values()])
        total = sum(s.numel() for s in scores.values())
        keep_flat = _prune_blocks(flat_scores, flat_counts, count_pruned(sparsity, total))
        sizes = [counts.numel() for _, counts in per_layer.values()]
        masks = {}
        for (name, (block_scores, _)), keep_blocks in zip(per_layer.items(), keep_flat.split(sizes)):
            shape = scores[name].shape
            keep = _expand_blocks(keep_blocks.reshape(block_scores.shape), pattern.block,
                                  as_matrix(scores[name]).shape)
            masks[name] = keep.reshape(shape).to(scores[name].device)
        return masks
    flat = torch.cat([s.detach().float().flatten().cpu() for s in scores.values()])
    keep_flat = prune_lowest(flat.reshape(1, -1), count_pruned(sparsity, flat.numel())).flatten()
    sizes = [s.numel() for s in scores.values()]
    return {name: keep.reshape(s.shape).to(s.device)
            for (name, s), keep in zip(scores.items(), keep_flat.split(sizes))}
