import json

import numpy as np
import pytest

from qtc.calibration.observers import CALIBRATORS, make_observer
from qtc.errors import QtcError


def stream(observer, chunks):
    for chunk in chunks:
        observer.update(chunk)
    return observer


def normal_chunks(seed=0, count=20, size=5000, grow_from=15, scale=8.0):
    """Standard normal chunks; those from `grow_from` on are `scale` times larger, forcing range doubling."""
    rng = np.random.default_rng(seed)
    chunks = [rng.standard_normal(size).astype(np.float32) for _ in range(count)]
    return [c * np.float32(scale) if i >= grow_from else c for i, c in enumerate(chunks)]


def heavy_tailed(seed=0):
    # Outliers rare enough (2 in 1e6) that clipping them costs less squared error than the coarse step they force.
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(1_000_000).astype(np.float32)
    data[[10, 20]] = [1000.0, -1000.0]
    return data


def test_minmax_is_exact_across_updates():
    observer = stream(
        make_observer("minmax"),
        [np.array([1.0, 2.0], np.float32), np.array([[-3.0, 0.5]], np.float32), np.full((2, 2, 2), 7.0, np.float32)],
    )
    assert observer.range() == (-3.0, 7.0)
    assert observer.count == 12
    symmetric = stream(make_observer("minmax", symmetric=True), [np.array([-3.0, 2.0], np.float32)])
    assert symmetric.range() == (-3.0, 3.0)


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.999])
def test_percentile_matches_numpy_within_a_bin(percentile):
    chunks = normal_chunks()
    observer = make_observer("percentile", percentile=percentile)
    observer.update(chunks[0])
    first_radius = observer.radius
    stream(observer, chunks[1:])
    assert observer.radius > first_radius  # the larger chunks really forced a doubling

    data = np.concatenate(chunks)
    # Histogram quantiles land in the bin holding the order statistic the inverted CDF picks.
    expected = np.percentile(data, [100.0 - percentile, percentile], method="inverted_cdf")
    assert np.allclose(observer.range(), expected, rtol=0, atol=observer.width)


def test_symmetric_percentile_uses_abs_values():
    chunks = normal_chunks(seed=1)
    observer = stream(make_observer("percentile", percentile=99.9, symmetric=True), chunks)
    t = np.percentile(np.abs(np.concatenate(chunks)), 99.9, method="inverted_cdf")
    lo, hi = observer.range()
    assert lo == -hi
    assert abs(hi - t) < observer.width


@pytest.mark.parametrize("bins", [12, 2048])
def test_range_doubling_is_exact(bins):
    rng = np.random.default_rng(2)
    # Growing magnitudes force several doublings; powers of two and bin edges sit exactly on boundaries.
    edge_values = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 1 / 3, 64.0, -64.0], np.float32)
    chunks = [rng.standard_normal(1000).astype(np.float32) * np.float32(s) for s in (0.3, 1, 5, 40, 300)]
    chunks.insert(2, edge_values)
    streamed = make_observer("percentile", bins=bins)
    streamed.update(chunks[0])
    first_radius = streamed.radius
    stream(streamed, chunks[1:])

    data = np.concatenate(chunks)
    at_once = stream(make_observer("percentile", bins=bins), [data])
    assert streamed.radius == at_once.radius >= 1024 * first_radius
    np.testing.assert_array_equal(streamed.hist, at_once.hist)
    if bins == 2048:  # binary-exact edges: numpy's own binning must agree
        reference, _ = np.histogram(data, bins=bins, range=(-streamed.radius, streamed.radius))
        np.testing.assert_array_equal(streamed.hist, reference)


@pytest.mark.parametrize("name", ["entropy", "mse"])
def test_heavy_tails_are_clipped(name):
    data = heavy_tailed()
    lo, hi = stream(make_observer(name), np.array_split(data, 20)).range()
    p1, p99 = np.percentile(data, [1, 99])
    assert p99 < hi < 0.5 * data.max()
    assert 0.5 * data.min() < lo < p1


@pytest.mark.parametrize("name", ["entropy", "mse"])
def test_uniform_data_keeps_nearly_full_range(name):
    data = np.random.default_rng(3).uniform(-1.0, 1.0, 200_000).astype(np.float32)
    lo, hi = stream(make_observer(name), np.array_split(data, 20)).range()
    assert hi > 0.95 * data.max()
    assert lo < 0.95 * data.min()


def test_entropy_ignores_relu_zero_spike():
    # Half the values are exact zeros; counted in the first bin they would pull the threshold below p99.
    data = np.maximum(np.random.default_rng(4).standard_normal(200_000), 0).astype(np.float32)
    lo, hi = stream(make_observer("entropy"), np.array_split(data, 20)).range()
    assert lo == 0.0
    assert np.percentile(data, 99.9) < hi <= data.max()


@pytest.mark.parametrize("name", CALIBRATORS)
def test_symmetric_ranges_are_symmetric(name):
    lo, hi = stream(make_observer(name, symmetric=True), normal_chunks(seed=5, count=4, grow_from=4)).range()
    assert lo == -hi and hi > 0


@pytest.mark.parametrize("name", CALIBRATORS)
def test_state_does_not_grow_with_samples(name):
    rng = np.random.default_rng(6)
    observer = make_observer(name)
    sizes = []
    for i in range(1000):
        # Magnitude keeps growing so the histogram range doubles along the way.
        observer.update(rng.standard_normal(64).astype(np.float32) * np.float32(1 + i))
        if i + 1 in (10, 1000):
            sizes.append(observer.state_nbytes)
    assert sizes[0] == sizes[1]
    assert sizes[0] <= 8 * 2048 + 100


@pytest.mark.parametrize("name", CALIBRATORS)
def test_non_finite_values_are_skipped(name):
    observer = make_observer(name)
    observer.update(np.array([1.0, np.nan, np.inf, -np.inf, -2.0], np.float32))
    assert (observer.count, observer.skipped) == (2, 3)
    assert (observer.min, observer.max) == (-2.0, 1.0)
    lo, hi = observer.range()
    assert -2.0 <= lo <= hi <= 1.0


@pytest.mark.parametrize("name", CALIBRATORS)
def test_range_without_finite_data_raises(name):
    observer = make_observer(name)
    with pytest.raises(QtcError):
        observer.range()
    observer.update(np.array([], np.float32))
    observer.update(np.array([np.nan, np.inf], np.float32))
    with pytest.raises(QtcError, match="no finite values"):
        observer.range()


def test_unknown_calibrator_raises():
    with pytest.raises(QtcError, match=r"unknown calibrator 'foo' \(choose from minmax, percentile, entropy, mse\)"):
        make_observer("foo")


@pytest.mark.parametrize("bins", [2046, 4])
def test_bins_must_be_a_multiple_of_four(bins):
    with pytest.raises(QtcError, match="multiple of 4"):
        make_observer("percentile", bins=bins)


@pytest.mark.parametrize("name", CALIBRATORS)
def test_summary_is_json(name):
    observer = make_observer(name)
    assert json.loads(json.dumps(observer.summary()))["count"] == 0
    stream(observer, normal_chunks(seed=7, count=3, grow_from=3))
    summary = json.loads(json.dumps(observer.summary()))
    assert summary["name"] == name
    assert summary["count"] == 15000
    assert [summary["lo"], summary["hi"]] == list(observer.range())
    assert summary["min"] <= summary["lo"] <= summary["hi"] <= summary["max"]
    assert "symmetric" in summary["options"]
