"""Observers: the per-tensor activation range a static int8 layer quantizes with.

Each observer is fed activations with ``observe(x)`` (calibrate does it from forward hooks) and
answers ``scale(qmax) -> float``, the symmetric per-tensor scale (x_q = round(x / scale), clamped
to [-qmax, qmax]). They hold a bounded amount of memory however much data they see.

MinMaxObserver      the largest |x| seen: nothing clips, outliers stretch the grid.
PercentileObserver  a high percentile of |x| (99.99 by default) on a bounded uniform sample.
MSEObserver         the clipping range that minimises the quantization MSE of a bounded sample.
"""
from __future__ import annotations

from typing import Callable, Dict, Union

import torch


class Observer:
    """Base class: tracks the count and the largest |x| of the activations it sees; subclasses
    define clip_range(qmax), the float range that maps to qmax."""

    def __init__(self) -> None:
        self.count = 0
        self.amax = 0.0

    def observe(self, x: torch.Tensor) -> None:
        """Record one batch of activations (any shape); NaN or Inf raises ValueError."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{type(self).__name__} observes float tensors, got {got}")
        if x.numel() == 0:
            return
        x = x.detach()
        if not torch.isfinite(x).all():
            raise ValueError(f"{type(self).__name__}: the activations contain NaN or Inf; a static "
                             "activation range cannot be calibrated from them")
        self.amax = max(self.amax, float(x.abs().amax()))
        self.count += x.numel()
        self._observe(x)

    def _observe(self, x: torch.Tensor) -> None:
        pass

    def clip_range(self, qmax: int) -> float:
        raise NotImplementedError

    def scale(self, qmax: int) -> float:
        """The symmetric per-tensor scale clip_range(qmax) / qmax (1 / qmax when every activation
        seen was zero, as the dynamic quantizer does for an all-zero row)."""
        if not isinstance(qmax, int) or isinstance(qmax, bool) or qmax < 1:
            raise ValueError(f"qmax must be a positive int, got {qmax!r}")
        if self.count == 0:
            raise RuntimeError(f"{type(self).__name__} has seen no activations: feed it with "
                               "observe() (sparseq.quant.calibrate does) before asking for a scale")
        clip = self.clip_range(qmax)
        return (clip if clip > 0 else 1.0) / qmax

    def __repr__(self) -> str:
        return f"{type(self).__name__}(count={self.count}, amax={self.amax:.6g})"


class MinMaxObserver(Observer):
    """Scale from the largest |x| seen: nothing clips."""

    def clip_range(self, qmax: int) -> float:
        return self.amax


class _SampledObserver(Observer):
    """Keeps a uniform random sample (without replacement) of at most ``max_samples`` of the |x|
    values seen across all batches: each value gets a random key and the smallest keys are kept,
    so memory stays bounded and every value seen is equally likely to be in the sample."""

    def __init__(self, max_samples: int = 1 << 18, seed: int = 12345) -> None:
        super().__init__()
        if not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be a positive int, got {max_samples!r}")
        self.max_samples = max_samples
        self._generator = torch.Generator().manual_seed(seed)
        self._values = torch.empty(0)
        self._keys = torch.empty(0)

    def _observe(self, x: torch.Tensor) -> None:
        values = torch.cat([self._values, x.abs().flatten().float().cpu()])
        keys = torch.cat([self._keys, torch.rand(x.numel(), generator=self._generator)])
        if values.numel() > self.max_samples:
            keys, keep = torch.topk(keys, self.max_samples, largest=False, sorted=False)
            values = values[keep]
        self._values, self._keys = values, keys

    @property
    def sample(self) -> torch.Tensor:
        """The sampled |x| values (float32, at most max_samples)."""
        return self._values


class PercentileObserver(_SampledObserver):
    """Scale from the ``percentile``-th percentile of |x| (linear interpolation, as
    torch.quantile), on a bounded uniform sample: the rare outliers above it clip."""

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 18, seed: int = 12345) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(max_samples, seed)
        self.percentile = percentile

    def clip_range(self, qmax: int) -> float:
        return float(torch.quantile(self._values.double(), self.percentile / 100.0))


def quantization_mse(values: torch.Tensor, clip: float, qmax: int) -> float:
    """Mean squared error of symmetric quantization of ``values`` with the scale clip / qmax
    (round half to even, clamp to [-qmax, qmax])."""
    scale = clip / qmax
    dequantized = torch.round(values / scale).clamp_(-qmax, qmax) * scale
    return float((values - dequantized).pow(2).mean())


class MSEObserver(_SampledObserver):
    """Scale from the clipping range c that minimises the quantization MSE of the sampled
    activations: c searched over ``grid`` evenly spaced fractions of the largest |x|, then
    refined on 20 points around the best one."""

    def __init__(self, grid: int = 100, max_samples: int = 1 << 18, seed: int = 12345) -> None:
        if not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid must be an int >= 2, got {grid!r}")
        super().__init__(max_samples, seed)
        self.grid = grid
        self._best: Dict[int, float] = {}
        self._best_count = -1

    def clip_range(self, qmax: int) -> float:
        if self.amax == 0:
            return 0.0
        if self._best_count != self.count:  # new data since the last search
            self._best, self._best_count = {}, self.count
        if qmax not in self._best:
            self._best[qmax] = self._search(qmax)
        return self._best[qmax]

    def _search(self, qmax: int) -> float:
        def mse(clip: float) -> float:
            return quantization_mse(self._values, clip, qmax)

        step = self.amax / self.grid
        best = min((step * i for i in range(1, self.grid + 1)), key=mse)
        fine = [best + step * (i / 10 - 1) for i in range(21)]
        return min([best] + [c for c in fine if 0 < c <= self.amax], key=mse)


OBSERVERS: Dict[str, Callable[[], Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}

ObserverSpec = Union[str, Callable[[], Observer]]


def make_observer(spec: ObserverSpec) -> Observer:
    """A fresh observer from a name ("minmax", "percentile", "mse") or a factory (a class or a
    function of no arguments returning an object with observe(x) and scale(qmax))."""
    if isinstance(spec, str):
        if spec not in OBSERVERS:
            raise ValueError(f"unknown observer {spec!r}; choose one of {sorted(OBSERVERS)} or pass a factory")
        return OBSERVERS[spec]()
    if not callable(spec):
        raise TypeError(f"observer must be a name or a factory returning an observer, got {type(spec).__name__}")
    observer = spec()
    if not (callable(getattr(observer, "observe", None)) and callable(getattr(observer, "scale", None))):
        raise TypeError(f"the observer factory returned a {type(observer).__name__}, which lacks "
                        "observe(x) and scale(qmax)")
    return observer


__all__ = ["Observer", "MinMaxObserver", "PercentileObserver", "MSEObserver", "OBSERVERS",
           "make_observer", "quantization_mse"]
