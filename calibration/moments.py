"""Streaming per-channel statistics of an activation X (last axis = channels), for the outlier algorithms.

Like the observers, their state is fixed in size: a vector per channel, or one K x K matrix.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class ChannelAbsMax:
    """max |x| per input channel: SmoothQuant's activation statistic."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        current = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0).astype(np.float64)
        self.value = current if self.value is None else np.maximum(self.value, current)


class ChannelRange:
    """Per input channel min and max of the finite values (and how many values were seen or skipped): a min/max
    range observer's state kept per channel, so the range of X / s (SmoothQuant and AWQ divide an activation's
    channels by s > 0) follows without running the rescaled graph again: min(X_c / s_c) = min(X_c) / s_c."""

    def __init__(self) -> None:
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.count = 0
        self.skipped = 0

    def update(self, x: np.ndarray) -> None:
        flat = x.reshape(-1, x.shape[-1])
        finite = np.isfinite(flat)
        seen = int(np.count_nonzero(finite))
        if seen == flat.size:
            low, high = flat.min(axis=0), flat.max(axis=0)
        else:  # as the observers do: a non-finite value is counted and ignored
            low, high = np.where(finite, flat, np.inf).min(axis=0), np.where(finite, flat, -np.inf).max(axis=0)
        self.count += seen
        self.skipped += flat.size - seen
        low, high = low.astype(np.float64), high.astype(np.float64)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)

    def rescale(self, s: np.ndarray) -> None:
        self.low, self.high = self.low / s, self.high / s

    def bounds(self) -> tuple[float, float]:
        """(min, max) over every channel's finite values; (inf, -inf) when none was seen."""
        seen = np.isfinite(self.low) if self.low is not None else np.zeros(0, bool)
        if not seen.any():
            return np.inf, -np.inf
        return float(self.low[seen].min()), float(self.high[seen].max())


GRAM_STRIP = 1024
GRAM_BUFFER_BYTES = 128 << 20
# Rows a Gram's buffer holds before they are added to its sum (at least K, at most GRAM_BUFFER_BYTES): one product of
# 4,096 rows runs BLAS faster than four of 1,024 (on rows already in memory: a 1,024-wide Gram of 16 k rows 0.18 ->
# 0.13 s, 2,048-wide 0.47 -> 0.42 s; gemma-3-270m's w4a16 GPTQ statistics pass 39.3 -> 36.8 s, farm-bench pairs), for
# buffers of 16 KB per input channel while the statistics stream (that pass's peak 1.93 -> 2.77 GB, below the
# held-out comparison's 5.1 GB).
GRAM_ROWS = 4096


def add_upper_product(total: np.ndarray, flat: np.ndarray) -> None:
    """total += flat^T flat on and above the diagonal, a strip of GRAM_STRIP rows at a time: X^T X is symmetric, so
    the strips right of the diagonal are about half the multiply-adds of the full product (GPTQ's Gram of an
    18,944-wide input is most of a 7B layer's calibration), and the temporary is one strip, not a K x K product
    (1.4 GB there). A strip's diagonal block is a.T @ a, which numpy computes with BLAS syrk (half a product's
    multiply-adds): 17 % off a 2,048-wide Gram, gemma-3-270m's down projection input."""
    columns = flat.shape[1]
    for start in range(0, columns, GRAM_STRIP):
        end = min(start + GRAM_STRIP, columns)
        strip = flat[:, start:end]
        total[start:end, start:end] += strip.T @ strip
        if end < columns:
            total[start:end, end:] += strip.T @ flat[:, end:]


def buffer_rows(width: int) -> int:
    """Rows of a `width`-wide Gram's buffer."""
    return max(1, min(max(width, GRAM_ROWS), GRAM_BUFFER_BYTES // (4 * width)))


def mirror_upper(total: np.ndarray) -> None:
    """Fill the lower triangle from the upper one that `add_upper_product` summed (diagonal strips are whole)."""
    columns = total.shape[0]
    for start in range(0, columns, GRAM_STRIP):
        end = min(start + GRAM_STRIP, columns)
        total[end:, start:end] = total[start:end, end:].T


class Gram:
    """H = E[x x^T] over tokens: the second moment GPTQ and AWQ use (E||X D||^2 = tr(D^T H D) for any weight
    error D, so candidate roundings can be scored without keeping X).

    Summed in float32 while samples stream in; `finish()` turns the sum into the float32 mean every reader uses
    (a flat and a segmented compile then read the same numbers). A finished Gram can be `offload`ed to a .npy file
    (segmented calibration of big models: one K x K matrix per layer input adds up to more than the model, 9.8 GB
    at float32 for qwen2.5-coder-1.5b); it is then read back memory-mapped whenever used, and replaced on disk when
    a smoothing scale rewrites it.
    """

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self._rows: np.ndarray | None = None  # tokens not yet in _sum (GRAM_ROWS or K of them, at most 128 MB)
        self._held = 0
        self._mean: np.ndarray | None = None
        self._file: Path | None = None
        self.tokens = 0

    def update(self, x: np.ndarray) -> None:
        if self._sum is None and (self._mean is not None or self._file is not None):
            raise RuntimeError("Gram.update after finish()")
        flat = x.reshape(-1, x.shape[-1])
        if self._sum is None:
            width = flat.shape[1]
            self._sum = np.zeros((width, width), np.float32)
            self._rows = np.empty((buffer_rows(width), width), np.float32)
        # rows wait in a buffer: a decode step brings one token, and adding its product to a K x K sum would read and
        # write all of it (1.4 GB for an 18,944-wide input) for K^2 multiply-adds
        start = 0
        while start < len(flat):
            taken = min(len(flat) - start, len(self._rows) - self._held)
            self._rows[self._held : self._held + taken] = flat[start : start + taken]
            self._held, start = self._held + taken, start + taken
            if self._held == len(self._rows):
                self._flush()
        self.tokens += len(flat)

    def _flush(self) -> None:
        # float32 throughout, as GPTQ's reference accumulates it; summing a few thousand samples' products loses
        # ~1e-4 relative at most, far below the 1 % damping GPTQ adds to the diagonal
        if self._held:
            add_upper_product(self._sum, self._rows[: self._held])
            self._held = 0

    def finish(self) -> None:
        if self._sum is not None:
            self._flush()
            self._rows = None
            mirror_upper(self._sum)
            self._sum /= np.float32(max(self.tokens, 1))
            self._mean, self._sum = self._sum, None

    def offload(self, path: Path) -> None:
        self.finish()
        if self._mean is not None:
            np.save(path, self._mean)
            self._file, self._mean = Path(path), None

    @property
    def mean(self) -> np.ndarray | None:
        """The float32 mean (memory-mapped when offloaded)."""
        self.finish()
        return np.load(self._file, mmap_mode="r") if self._file is not None else self._mean

    def rescale(self, s: np.ndarray) -> None:
        """The Gram of X / s (smoothing and AWQ divide an activation's channels by s)."""
        scaled = (self.mean / np.outer(s, s)).astype(np.float32)
        if self._file is None:
            self._mean = scaled
            return
        staging = self._file.with_suffix(".tmp.npy")
        np.save(staging, scaled)
        os.replace(staging, self._file)
