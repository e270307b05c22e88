"""Array helpers: the exact high percentile that partitions only the values near the top."""

import numpy as np
import pytest

from qtc.util import arrays
from qtc.util.arrays import high_percentile


@pytest.mark.parametrize("shape", ["normal", "ties", "heavy_tail", "sorted"])
def test_high_percentile_equals_numpy(shape):
    rng = np.random.default_rng(1)
    n = 1_000_003
    values = {"normal": rng.standard_normal(n),
              "ties": rng.integers(0, 5, n).astype(np.float64),  # most values equal the answer
              "heavy_tail": rng.pareto(1.5, n),
              "sorted": np.sort(rng.standard_normal(n))[::-1].copy()}[shape].astype(np.float32)
    for q in (99.9, 99.0, 50.0):
        assert high_percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-6, abs=1e-12)


def test_high_percentile_falls_back_where_the_sample_misleads(monkeypatch):
    """Large values that the strided sample over-represents put its bound above the answer; a NaN is neither
    above nor below it: numpy's answer for both."""
    calls = []
    original = np.percentile
    monkeypatch.setattr(arrays.np, "percentile", lambda *a, **k: calls.append(1) or original(*a, **k))
    values = np.zeros(1 << 20, np.float32)
    values[::16][:600] = 1.0  # 0.9 % of the sample, 0.06 % of the values: the 99.9th percentile is 0
    assert high_percentile(values, 99.9) == float(original(values, 99.9)) == 0.0
    assert len(calls) == 2  # the sample's bound, then the full fallback
    calls.clear()
    values[7] = np.nan
    assert np.isnan(high_percentile(values, 99.9))
    assert len(calls) == 2
    calls.clear()
    values[7] = 0.0
    values[1::16] = 3.0  # the usual case: the bound holds, no fallback
    assert high_percentile(values, 99.9) == float(original(values, 99.9)) == 3.0
    assert len(calls) == 1
