"""Agreement statistics and the compile's checks: sliced sums in float64, one session per model when shared."""

import numpy as np
import pytest

import qtc
from qtc.backends import base, compare
from qtc.util.arrays import log_softmax


def test_sliced_statistics_equal_whole_array_float64(monkeypatch):
    monkeypatch.setattr(compare, "_SLICE", 1000)  # many slices (and row blocks) on a small output
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 7, 900), dtype=np.float32) * 4
    out = ref + rng.standard_normal(ref.shape, dtype=np.float32) * 0.5
    stats = compare.OutputStats()
    stats.update(ref, out, logits=True)
    got = stats.result()
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    # float32 products (each rounded by <= 6e-8) summed in float64, float32 exponentials: the float64 figures to
    # ~1e-9 here (12,600 elements; less on a real output's millions), not to the last bit
    assert got["cosine"] == pytest.approx(r @ o / np.sqrt((r @ r) * (o @ o)), rel=1e-9)
    assert got["max_abs_diff"] == pytest.approx(np.abs(r - o).max(), rel=1e-12)
    assert got["p99.9_rel_diff"] == pytest.approx(np.percentile(np.abs(r - o) / np.maximum(np.abs(r), 1e-6), 99.9), rel=1e-5)
    assert got["top1_agreement"] == np.mean(ref.argmax(-1) == out.argmax(-1))
    lr, lo = log_softmax(ref), log_softmax(out)
    assert got["kl_per_position"] == pytest.approx((np.exp(lr) * (lr - lo)).sum() / 14, rel=1e-6)


def test_a_compile_loads_the_source_and_the_output_once_for_its_checks(kv_decoder, monkeypatch):
    """The post-compile check and the held-out comparison share one session per model where both fit, with the
    same figures as the separate sessions (and temporary files) used where they do not."""
    opened = []
    original = base._inference_session
    monkeypatch.setattr(base, "_inference_session", lambda *args: opened.append(1) or original(*args))
    options = {"recipe": "w8a8", "calib": "zh-news", "samples": 2, "seq_len": 32, "quiet": True}
    shared = qtc.compile(kv_decoder, **options)
    # calibration's session, then the source and the output once each (the output's also wrote ORT's optimized
    # graph for runtime_ops)
    assert len(opened) == 3
    opened.clear()
    # a limit under which the two sessions are not held together (nor is anything spilled or segmented)
    apart = qtc.compile(kv_decoder, memory_limit=7 * shared.report["size"]["source_tensor_bytes"], **options)
    # the check's source twice (does it run; its outputs), the held-out pair again, runtime_ops' own session
    assert len(opened) == 7
    for key in ("post_compile_check", "heldout_comparison", "runtime_ops"):
        assert shared.report[key] == apart.report[key]
    assert shared.report["memory"]["check_peak_rss_bytes"].keys() >= {"post_compile_check", "heldout_comparison"}
    assert shared.report["seconds"]["checks"]["heldout_comparison"] > 0
