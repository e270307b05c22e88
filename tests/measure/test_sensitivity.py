"""layer_sensitivity on a hand-built graph of two independent layers, from statistics streamed through ORT CPU by
the analysis pipeline: the noisier layer ranks first, and the weight SQNR is the one measured on the same data."""

import numpy as np
import pytest

from qtc.calibration.data import load_calibration
from qtc.core.quant_math import dequantize_array, weight_qparams
from qtc.measure.sensitivity import layer_sensitivity
from qtc.passes.pipeline import build_analysis_pipeline
from qtc.recipes import builtin_recipe
from tests import graphs

HIDDEN = 16
OUTLIER_CHANNEL = 3


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.25, (HIDDEN, HIDDEN)), rng.normal(0, 0.25, (HIDDEN, HIDDEN))


def _samples(n=6, seed=1, outlier=1.0) -> list[dict[str, np.ndarray]]:
    """Feeds for `a` and `b`, N(0, 1); channel 3 of `b` is `outlier` times wider."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        a, b = (rng.normal(0, 1, (1, 8, HIDDEN)).astype(np.float32) for _ in range(2))
        b[..., OUTLIER_CHANNEL] *= outlier
        feeds.append({"a": a, "b": b})
    return feeds


def _analyze(tmp_path, recipe: str, weights, samples):
    folder = graphs.write_npz(tmp_path / "calib", samples)
    calib = load_calibration(folder, tokenizer=None, n_samples=100, seq_len=8, seed=0)
    assert calib.n_samples == len(samples) - 1  # the last file is held out
    model = graphs.two_layers(*weights)
    build_analysis_pipeline(builtin_recipe(recipe), "cpu", calib, quiet=True)(model)
    rows = layer_sensitivity(model)
    return {row["node"]: row for row in rows}, rows, samples[: calib.n_samples]


def test_an_outlier_activation_channel_makes_its_layer_most_sensitive(tmp_path):
    by_node, rows, used = _analyze(tmp_path, "w8a8", _weights(), _samples(outlier=50.0))
    assert [r["node"] for r in rows] == ["layer_b", "layer_a"]  # lowest SQNR first
    quiet, noisy = by_node["layer_a"], by_node["layer_b"]
    assert noisy["sqnr_db"] < quiet["sqnr_db"] - 6
    # the per-tensor activation step, stretched by one channel, is what makes the noise
    assert noisy["dominant_noise"] == "activation" and noisy["activation_sqnr_db"] < noisy["weight_sqnr_db"] - 6
    assert noisy["activation"] == "b" and quiet["activation"] == "a"
    b = np.stack([s["b"] for s in used])
    assert noisy["activation_minmax"] == pytest.approx([b.min(), b.max()])  # minmax over calibration samples only
    channel_max = np.abs(b).reshape(-1, HIDDEN).max(axis=0)
    assert noisy["channel_absmax_top"][0] == pytest.approx(channel_max[OUTLIER_CHANNEL])
    assert noisy["channel_absmax_median"] == pytest.approx(np.median(channel_max))


def test_without_the_outlier_both_layers_are_alike(tmp_path):
    by_node, _, _ = _analyze(tmp_path, "w8a8", _weights(), _samples(outlier=1.0))
    assert abs(by_node["layer_a"]["sqnr_db"] - by_node["layer_b"]["sqnr_db"]) < 3


def test_weight_sqnr_is_the_output_sqnr_measured_on_the_calibration_data(tmp_path):
    w_a, w_b = _weights()
    w_b[0] *= 20  # one input channel's weights stretch every column's per-channel scale
    by_node, rows, used = _analyze(tmp_path, "w8a16", (w_a, w_b), _samples())
    assert rows[0]["node"] == "layer_b" and by_node["layer_b"]["weight_sqnr_db"] < by_node["layer_a"]["weight_sqnr_db"] - 6
    spec = builtin_recipe("w8a16").weight
    for name, w, x in (("layer_a", w_a, "a"), ("layer_b", w_b, "b")):
        row = by_node[name]
        assert "activation" not in row and row["dominant_noise"] == "weight"  # weight-only: no activation term
        w = w.astype(np.float32)
        tokens = np.concatenate([s[x].reshape(-1, HIDDEN) for s in used]).astype(np.float64)
        error = dequantize_array(*weight_qparams(w, spec, 1), axis=1).astype(np.float64) - w
        measured = 10 * np.log10(np.sum((tokens @ w) ** 2) / np.sum((tokens @ error) ** 2))
        assert row["weight_sqnr_db"] == pytest.approx(measured, abs=1e-3)
        assert row["sqnr_db"] == row["weight_sqnr_db"]
