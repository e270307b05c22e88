"""Streaming range observers: each activation tensor is seen once and reduced into fixed-size state.

Calibration feeds every tensor an ONNX Runtime run produces to `observer.update(x)`; at the end `range()`
gives the clip range `(lo, hi)` that int8 scale and zero point are derived from. Nothing here keeps an
activation: state is a running min/max/count and, for the histogram observers, one `bins`-bin histogram, so
memory does not grow with the number of calibration samples.

Non-finite values (NaN, +-inf) are counted in `skipped` and otherwise ignored: one overflowing sample must
not stretch the range of every later one.
"""

import math

import numpy as np

from qtc.errors import QtcError

CALIBRATORS = ("minmax", "percentile", "entropy", "mse")

# Every scalar of state (count, min, max, ...) is accounted as one 8-byte number.
_SCALAR_NBYTES = 8


class Observer:
    """Running min, max and element count; subclasses add what their `range()` needs."""

    name = ""
    _scalars = ("count", "skipped", "min", "max")

    def __init__(self, *, symmetric: bool = False):
        self.symmetric = symmetric
        self.count = 0
        self.skipped = 0
        self.min = math.inf
        self.max = -math.inf

    def update(self, x: np.ndarray) -> None:
        values = np.asarray(x).ravel()
        finite = np.isfinite(values)
        if not finite.all():
            self.skipped += values.size - int(np.count_nonzero(finite))
            values = values[finite]
        if values.size == 0:
            return
        self.count += values.size
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))
        self._observe(values)

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            raise QtcError(f"{self.name} observer saw no finite values: cannot derive a range")
        lo, hi = self._range()
        return float(lo), float(hi)

    @property
    def state_nbytes(self) -> int:
        return _SCALAR_NBYTES * len(self._scalars)

    @property
    def options(self) -> dict:
        return {"symmetric": self.symmetric}

    def summary(self) -> dict:
        seen = self.count > 0
        lo, hi = self.range() if seen else (None, None)
        return {
            "name": self.name,
            "options": self.options,
            "count": self.count,
            "skipped": self.skipped,
            "min": self.min if seen else None,
            "max": self.max if seen else None,
            "lo": lo,
            "hi": hi,
        }

    def _observe(self, values: np.ndarray) -> None:
        """Fold a non-empty batch of finite values into subclass state (min/max/count are already done)."""

    def _range(self) -> tuple[float, float]:
        raise NotImplementedError

    def _max_abs(self) -> float:
        return max(-self.min, self.max)


class MinMaxObserver(Observer):
    name = "minmax"

    def _range(self) -> tuple[float, float]:
        if self.symmetric:
            return -self._max_abs(), self._max_abs()
        return self.min, self.max


class HistogramObserver(Observer):
    """A `bins`-bin histogram over [-radius, radius]; radius is a power of two that doubles as data grows.

    Bin k holds x with floor(x / width) == k - bins/2, width = 2 * radius / bins. Doubling the radius merges
    adjacent bin pairs into the middle half of the histogram. With bins % 4 == 0 the merged pairs land exactly
    on new bins (bins % 2 == 0 alone leaves them half a bin off), and since floor(x / 2w) == floor(floor(x / w) / 2)
    holds in floating point too, a streamed histogram equals one computed in one go over the final radius.
    """

    _scalars = Observer._scalars + ("radius",)

    def __init__(self, *, bins: int = 2048, symmetric: bool = False):
        if bins < 8 or bins % 4:
            raise QtcError(f"histogram bins must be a multiple of 4 and at least 8, got {bins}")
        super().__init__(symmetric=symmetric)
        self.bins = bins
        self.radius = 0.0
        self.hist = np.zeros(bins, dtype=np.int64)

    @property
    def state_nbytes(self) -> int:
        return super().state_nbytes + self.hist.nbytes

    @property
    def options(self) -> dict:
        return {**super().options, "bins": self.bins}

    @property
    def width(self) -> float:
        return 2.0 * self.radius / self.bins

    def folded(self) -> np.ndarray:
        """Histogram of |x|: bins/2 bins of `width` over [0, radius]."""
        half = self.bins // 2
        return self.hist[half:] + self.hist[:half][::-1]

    def _observe(self, values: np.ndarray) -> None:
        # Strictly above max|x| so that no value sits on the top edge, where it would need clamping into the
        # last bin and doubling would then move it to the wrong one. frexp(0) gives radius 1.0 for all zeros.
        needed = math.ldexp(1.0, math.frexp(self._max_abs())[1])
        if self.radius == 0.0:
            self.radius = needed
        while self.radius < needed:
            self._double()
        index = np.floor(values.astype(np.float64) / self.width).astype(np.int64) + self.bins // 2
        self.hist += np.bincount(index, minlength=self.bins)

    def _double(self) -> None:
        pairs = self.hist.reshape(-1, 2).sum(axis=1)
        quarter = self.bins // 4
        self.hist[:] = 0
        self.hist[quarter : quarter + pairs.size] = pairs
        self.radius *= 2.0


def _quantile(counts: np.ndarray, start: float, width: float, q: float) -> float:
    """The value below which a fraction q of the histogram's mass lies, linear within the bin that crosses it."""
    cumulative = np.cumsum(counts)
    target = q * cumulative[-1]
    i = min(int(np.searchsorted(cumulative, target)), counts.size - 1)
    below = cumulative[i] - counts[i]
    inside = (target - below) / counts[i] if counts[i] else 0.0
    return start + (i + inside) * width


class PercentileObserver(HistogramObserver):
    name = "percentile"

    def __init__(self, *, bins: int = 2048, percentile: float = 99.999, symmetric: bool = False):
        if not 50.0 < percentile <= 100.0:
            raise QtcError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins=bins, symmetric=symmetric)
        self.percentile = percentile

    @property
    def options(self) -> dict:
        return {**super().options, "percentile": self.percentile}

    def _range(self) -> tuple[float, float]:
        q = self.percentile / 100.0
        if self.symmetric:
            t = min(_quantile(self.folded(), 0.0, self.width, q), self._max_abs())
            return -t, t
        lo = _quantile(self.hist, -self.radius, self.width, 1.0 - q)
        hi = _quantile(self.hist, -self.radius, self.width, q)
        return max(lo, self.min), min(hi, self.max)


class _QuantizedHistogramObserver(HistogramObserver):
    """A histogram observer whose choice depends on how many levels the quantized tensor gets."""

    def __init__(self, *, bins: int = 2048, num_quant_levels: int = 256, symmetric: bool = False):
        if not 2 <= num_quant_levels <= bins:
            raise QtcError(f"num_quant_levels must be in [2, bins={bins}], got {num_quant_levels}")
        super().__init__(bins=bins, symmetric=symmetric)
        self.num_quant_levels = num_quant_levels

    @property
    def options(self) -> dict:
        return {**super().options, "num_quant_levels": self.num_quant_levels}


# Stands in for zero in Q where P has mass (the clipped outliers landed in a bin the slice had empty), as
# TensorRT/MXNet smoothing does: clipping then costs a finite penalty that grows with the clipped mass.
_EMPTY_BIN_COUNT = 1e-4


def _kl_divergence(sliced: np.ndarray, outliers: float, levels: int) -> float:
    """KL(P || Q) for one threshold, TensorRT's recipe.

    P is the sliced |x| histogram with the outliers beyond it added to its last bin. Q quantizes the slice
    *without* the outliers into `levels` groups and spreads each group's mass evenly over its non-empty bins;
    quantizing P itself would give Q == P whenever a group is one bin wide, so the smallest threshold would
    always win.
    """
    p = sliced.astype(np.float64)
    p[-1] += outliers
    group = np.arange(sliced.size) * levels // sliced.size
    nonempty = sliced > 0
    group_mass = np.bincount(group, weights=sliced, minlength=levels)
    group_bins = np.bincount(group, weights=nonempty, minlength=levels)
    q = np.where(nonempty, group_mass[group] / np.maximum(group_bins[group], 1), 0.0)
    q[(q == 0) & (p > 0)] = _EMPTY_BIN_COUNT
    used = p > 0
    p, q = p[used] / p.sum(), q[used] / q.sum()
    return float(np.sum(p * np.log(p / q)))


class EntropyObserver(_QuantizedHistogramObserver):
    """Threshold t on |x| minimising KL divergence between the clipped and the quantized distribution.

    Candidates run from all folded bins down to num_quant_levels/2 of them. Each costs ~0.1 ms, so at most
    `max_candidates` are evaluated, every k-th one (k = 3 at the default 2048 bins: t is found to within 3
    bins, ~30 ms). Counting down keeps the full range among them and makes ties favour the wider range.
    """

    name = "entropy"
    _scalars = _QuantizedHistogramObserver._scalars + ("zeros",)
    max_candidates = 300

    def __init__(self, *, bins: int = 2048, num_quant_levels: int = 256, symmetric: bool = False):
        super().__init__(bins=bins, num_quant_levels=num_quant_levels, symmetric=symmetric)
        self.zeros = 0

    def _observe(self, values: np.ndarray) -> None:
        super()._observe(values)
        self.zeros += int(np.count_nonzero(values == 0))

    def _range(self) -> tuple[float, float]:
        # Exact zeros (half of a ReLU output) are exact under any range; left in, their one-bin spike gets
        # smeared over a whole group in Q, dominates the divergence and drags t far below the data's tail.
        folded = self.folded()
        folded[0] -= self.zeros
        levels = self.num_quant_levels // 2
        # outliers[i] = folded[i:].sum(): the mass a threshold of i bins clips.
        outliers = np.cumsum(folded[::-1])[::-1].tolist() + [0]
        stride = -(-(folded.size - levels + 1) // self.max_candidates)
        candidates = range(folded.size, levels - 1, -stride)
        divergence = [_kl_divergence(folded[:i], outliers[i], levels) for i in candidates]
        t = candidates[int(np.argmin(divergence))] * self.width
        if self.symmetric:
            t = min(t, self._max_abs())
            return -t, t
        return max(self.min, -t), min(self.max, t)


class MseObserver(_QuantizedHistogramObserver):
    """Clip range [lo, hi] = s * [min, max] (or s * [-max|x|, max|x|]) minimising expected squared error.

    Error per histogram bin centre v: step^2 / 12 of rounding, plus (v - clip(v))^2 when v lies outside. The
    step comes from the range widened to include 0, as the caller will quantize that range.
    """

    name = "mse"
    scales = np.linspace(0.3, 1.0, 100)

    def _range(self) -> tuple[float, float]:
        if self.symmetric:
            hi = self._max_abs() * self.scales
            lo = -hi
        else:
            lo, hi = self.min * self.scales, self.max * self.scales
        centers = (np.arange(self.bins) - self.bins // 2 + 0.5) * self.width
        clipped = np.clip(centers[None, :], lo[:, None], hi[:, None])
        step = (np.maximum(hi, 0.0) - np.minimum(lo, 0.0)) / (self.num_quant_levels - 1)
        error = (centers[None, :] - clipped) ** 2 @ self.hist + step**2 / 12.0 * self.count
        best = int(np.argmin(error))
        return lo[best], hi[best]


def make_observer(
    name: str,
    *,
    bins: int = 2048,
    percentile: float = 99.999,
    num_quant_levels: int = 256,
    symmetric: bool = False,
) -> Observer:
    """An observer for calibrator `name`; options a calibrator does not use are ignored."""
    if name not in CALIBRATORS:
        raise QtcError(f"unknown calibrator {name!r} (choose from {', '.join(CALIBRATORS)})")
    if name == "minmax":
        return MinMaxObserver(symmetric=symmetric)
    if name == "percentile":
        return PercentileObserver(bins=bins, percentile=percentile, symmetric=symmetric)
    quantized = EntropyObserver if name == "entropy" else MseObserver
    return quantized(bins=bins, num_quant_levels=num_quant_levels, symmetric=symmetric)
