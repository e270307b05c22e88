"""Array helpers with no domain of their own."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, in float64 (262k-way vocabularies lose the tail in float32)."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


_SAMPLED = 1 << 16  # elements of the strided sample that bounds a high percentile


def high_percentile(values: np.ndarray, q: float) -> float:
    """np.percentile(values, q) (linear interpolation) for q near 100 on a large 1-D float array, exactly, without
    partitioning all of it: a strided sample's percentile at four times the distance from 100 bounds the answer from
    below, and only the values at or above the bound (~0.4 % for q = 99.9) are partitioned. A [256, 262144] logits
    output's 67 M relative errors took 1 s to partition, 40 % of the held-out comparison's statistics. Falls back to
    np.percentile where the bound misses or a value is NaN."""
    n = values.size
    if n <= 4 * _SAMPLED or not 0 < q < 100:
        return float(np.percentile(values, q))
    position = q / 100 * (n - 1)
    low = int(position)
    bound = np.percentile(values[:: n // _SAMPLED], max(0.0, 100 - 4 * (100 - q)))
    candidates = values[values >= bound]
    below = int(np.count_nonzero(values < bound))
    if below + len(candidates) != n or below > low:  # a NaN is neither; or the bound lies above the answer
        return float(np.percentile(values, q))
    k = low - below  # q < 100 puts low at n - 2 at most, so k + 1 is a candidate
    nearest = np.partition(candidates, [k, k + 1])
    lower, upper = float(nearest[k]), float(nearest[k + 1])
    return lower + (position - low) * (upper - lower)
