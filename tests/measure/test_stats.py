"""Bootstrap intervals: seeded, paired, and wide or narrow where they should be."""

import numpy as np

from qtc.measure.stats import bootstrap_interval, estimate


def test_interval_covers_true_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = {"x": rng.normal(2.0, 1.0, 50)}
    large = {"x": rng.normal(2.0, 1.0, 5000)}
    mean = lambda c: c["x"].mean(1)  # noqa: E731
    lo_s, hi_s = bootstrap_interval(small, mean)
    lo_l, hi_l = bootstrap_interval(large, mean)
    assert lo_l < 2.0 < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # ~sqrt(100) narrower


def test_same_seed_same_interval_other_seed_differs():
    columns = {"x": np.random.default_rng(2).normal(size=200)}
    mean = lambda c: c["x"].mean(1)  # noqa: E731
    assert bootstrap_interval(columns, mean, seed=3) == bootstrap_interval(columns, mean, seed=3)
    assert bootstrap_interval(columns, mean, seed=3) != bootstrap_interval(columns, mean, seed=4)


def test_paired_delta_is_tighter_than_unpaired_spread():
    rng = np.random.default_rng(5)
    difficulty = rng.gamma(2.0, 2.0, 400)  # shared per-unit difficulty dominates both scores
    columns = {"a": difficulty + 0.10 + rng.normal(0, 0.01, 400), "b": difficulty, "chars": np.ones(400)}
    delta = estimate(columns, lambda c: (c["a"].sum(1) - c["b"].sum(1)) / c["chars"].sum(1))
    assert abs(delta["value"] - 0.10) < 0.01
    assert delta["ci95"][0] > 0.09 and delta["ci95"][1] < 0.11
    alone = estimate(columns, lambda c: c["a"].mean(1))
    assert alone["ci95"][1] - alone["ci95"][0] > 20 * (delta["ci95"][1] - delta["ci95"][0])
