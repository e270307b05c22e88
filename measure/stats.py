"""Honest uncertainty: seeded percentile bootstrap over evaluation units (paragraphs, reviews, sentences).

Units are resampled with replacement; a paired interval resamples the *same* units for model and baseline,
so the shared difficulty of each paragraph cancels out of the delta.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

N_BOOT = 2000
LEVEL = 0.95

Statistic = Callable[[dict[str, np.ndarray]], np.ndarray]


def bootstrap_interval(
    columns: dict[str, np.ndarray], statistic: Statistic, *, seed: int = 0, n_boot: int = N_BOOT, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile interval of `statistic` over resampled units.

    `columns` holds one value per unit per column (all the same length); `statistic` maps columns of shape
    [n_boot, n_units] to one value per resample, e.g. ``lambda c: c["nll"].sum(1) / c["chars"].sum(1)``.
    """
    n_units = len(next(iter(columns.values())))
    if n_units == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_units, size=(n_boot, n_units))
    resampled = {name: np.asarray(values)[draws] for name, values in columns.items()}
    values = statistic(resampled)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def estimate(columns: dict[str, np.ndarray], statistic: Statistic, *, seed: int = 0) -> dict:
    """The statistic on all units and its bootstrap interval: {"value", "ci95", "n"}."""
    whole = {name: np.asarray(values)[None, :] for name, values in columns.items()}
    low, high = bootstrap_interval(columns, statistic, seed=seed)
    return {"value": float(statistic(whole)[0]), "ci95": [low, high], "n": len(next(iter(columns.values())))}
