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


class Gram:
    """H = X^T X summed over tokens (float64), and the token count: the second moment GPTQ and AWQ use.

    E||X D||^2 = tr(D^T H D) / n for any weight error D, so candidate roundings can be scored without keeping X.
    A finished Gram can be `offload`ed to a .npy file (segmented calibration of big models: one K x K float64
    matrix per layer input adds up to more than the model, 19.6 GB for qwen2.5-coder-1.5b); it is then read back,
    memory-mapped, whenever used, and replaced on disk when a smoothing scale rewrites it.
    """

    def __init__(self) -> None:
        self._matrix: np.ndarray | None = None
        self._file: Path | None = None
        self.tokens = 0

    @property
    def matrix(self) -> np.ndarray | None:
        return np.load(self._file, mmap_mode="r") if self._file is not None else self._matrix

    @matrix.setter
    def matrix(self, value: np.ndarray) -> None:
        if self._file is None:
            self._matrix = value
            return
        staging = self._file.with_suffix(".tmp.npy")
        np.save(staging, value)
        os.replace(staging, self._file)

    def update(self, x: np.ndarray) -> None:
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self._matrix = flat.T @ flat if self._matrix is None else self._matrix + flat.T @ flat
        self.tokens += flat.shape[0]

    def offload(self, path: Path) -> None:
        if self._matrix is not None:
            np.save(path, self._matrix)
            self._file, self._matrix = Path(path), None

    @property
    def mean(self) -> np.ndarray:
        return self.matrix / max(self.tokens, 1)
