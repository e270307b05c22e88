"""Streaming second moments (one float32 mean whether kept in memory or offloaded, closed once finished) and the
blocked float32 factorizations GPTQ runs on them."""

import numpy as np
import pytest

from qtc.calibration import moments
from qtc.calibration.moments import Gram
from qtc.core.linalg import cholesky_lower_, invert_lower_
from qtc.passes.rounding import inverse_cholesky

RNG = np.random.default_rng(0)


def _gram(chunks):
    gram = Gram()
    for x in chunks:
        gram.update(x)
    return gram


def test_offloaded_gram_reads_and_rescales_bit_for_bit_like_the_in_memory_one(tmp_path):
    chunks = [RNG.normal(size=(2, 7, 24)) * 3 for _ in range(4)]
    kept, offloaded = _gram(chunks), _gram(chunks)
    offloaded.offload(tmp_path / "0.npy")
    assert kept.mean.dtype == np.float32 and isinstance(offloaded.mean, np.memmap)
    assert np.array_equal(kept.mean, offloaded.mean)
    flat = np.concatenate([x.reshape(-1, 24) for x in chunks])
    np.testing.assert_allclose(kept.mean, flat.T @ flat / len(flat), rtol=1e-5, atol=1e-5)
    s = RNG.uniform(0.5, 2.0, size=24)
    kept.rescale(s)
    offloaded.rescale(s)
    assert np.array_equal(kept.mean, offloaded.mean)
    assert (tmp_path / "0.npy").stat().st_size < 24 * 24 * 4 + 256  # float32 on disk: half the float64 scratch


def test_gram_of_prefills_and_single_decode_tokens_is_the_whole_product_and_exactly_symmetric(monkeypatch):
    """Rows wait in a small buffer (a decode step brings one token) and only strips on and above the diagonal are
    summed; the mean is still X^T X / n, mirrored bit for bit. Strips and buffer shrunk so a 24-wide input takes
    several of each."""
    monkeypatch.setattr(moments, "GRAM_STRIP", 5)
    monkeypatch.setattr(moments, "GRAM_BUFFER_BYTES", 4 * 24 * 7)  # 7 rows
    chunks = [RNG.normal(size=(1, n, 24)).astype(np.float32) for n in (9, 1, 1, 1, 13, 2, 1)]
    gram = _gram(chunks)
    flat = np.concatenate([x.reshape(-1, 24) for x in chunks]).astype(np.float64)
    assert gram.tokens == len(flat) == 28
    np.testing.assert_allclose(gram.mean, flat.T @ flat / len(flat), rtol=1e-5, atol=1e-6)
    assert np.array_equal(gram.mean, gram.mean.T)


def test_a_finished_gram_takes_no_more_samples():
    gram = _gram([RNG.normal(size=(5, 8))])
    gram.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        gram.update(RNG.normal(size=(5, 8)))


@pytest.mark.parametrize("n, block", [(7, 3), (300, 64), (600, 256)])
def test_blocked_factors_match_float64_lapack(n, block):
    x = RNG.normal(size=(3 * n, n)).astype(np.float32)
    h = x.T @ x / (3 * n) + 0.01 * np.eye(n, dtype=np.float32)
    lower = cholesky_lower_(h.copy(), block)
    reference = np.linalg.cholesky(h.astype(np.float64))
    np.testing.assert_allclose(lower, reference, atol=1e-5)
    np.testing.assert_allclose(invert_lower_(lower.copy(), block), np.linalg.inv(reference), atol=1e-5)


def _h(n=64, seed=0):
    x = np.random.default_rng(seed).normal(size=(6 * n, n)).astype(np.float32)
    return x.T @ x / (6 * n)


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse_in_float32():
    h = _h()
    order, dead = np.argsort(-np.diag(h), kind="stable"), np.zeros(64, bool)
    upper = inverse_cholesky(h, order, dead, 0.01)
    assert upper.dtype == np.float32 and np.allclose(np.triu(upper), upper)
    damped = h[np.ix_(order, order)].astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(64)
    np.testing.assert_allclose(upper.T @ upper, np.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def test_a_float32_factorization_that_breaks_down_falls_back_to_float64_from_h(monkeypatch):
    """The in-place factorization may fail half way through its buffer: the fallback starts again from H."""
    import qtc.passes.rounding as rounding

    h = _h()
    order, dead = np.arange(64), np.zeros(64, bool)
    dead[5] = True
    blocked = inverse_cholesky(h, order, dead, 0.01)

    def breaks_down(flipped):
        flipped[:] = np.nan  # what a half-done in-place factorization leaves
        raise np.linalg.LinAlgError("Matrix is not positive definite")

    monkeypatch.setattr(rounding, "inverse_cholesky_upper", breaks_down)
    fallback = inverse_cholesky(h, order, dead, 0.01)
    assert fallback.dtype == np.float32
    np.testing.assert_allclose(fallback, blocked, atol=1e-5)


def test_channel_range_is_a_min_max_observer_per_channel_and_rescales():
    import numpy as np

    from qtc.calibration.moments import ChannelRange
    from qtc.calibration.observers import MinMaxObserver

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    x[0, 1, 2], x[1, 3, 0] = np.nan, np.inf  # counted as skipped and ignored, as the observers do
    channels, observer = ChannelRange(), MinMaxObserver()
    for sample in x:
        channels.update(sample)
        observer.update(sample)
    assert (channels.count, channels.skipped) == (observer.count, observer.skipped) == (28, 2)
    assert channels.bounds() == (observer.min, observer.max)
    s = np.array([2.0, 0.5, 4.0])
    channels.rescale(s)
    finite = np.where(np.isfinite(x), x, np.nan) / s
    assert channels.bounds() == pytest.approx((np.nanmin(finite), np.nanmax(finite)))
