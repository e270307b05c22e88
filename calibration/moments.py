"""Streaming per-channel statistics of an activation X (last axis = channels), for the outlier algorithms.

Like the observers, their state is fixed in size: a vector per channel, or one K x K matrix.
"""

from __future__ import annotations

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
    """

    def __init__(self) -> None:
        self.matrix: np.ndarray | None = None
        self.tokens = 0

    def update(self, x: np.ndarray) -> None:
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self.matrix = flat.T @ flat if self.matrix is None else self.matrix + flat.T @ flat
        self.tokens += flat.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.matrix / max(self.tokens, 1)
