"""SmoothQuant, GPTQ and AWQ: float semantics preserved by channel scaling; data-driven rounding beats RTN."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qtc
from qtc.calibration.moments import Gram
from qtc.core.quant_math import expand_scale
from qtc.passes.rounding import clip_search, gptq, gptq_with_error, node_axis
from qtc.passes.smooth import weighted_error
from qtc.recipes import QuantSpec, parse_recipe

RNG = np.random.default_rng(0)


def _h_error(q, scale, zero_point, w, h, spec):
    axis = node_axis(spec)
    d = (q - expand_scale(zero_point.astype(np.float64), w.shape, axis, spec.block_size)) * \
        expand_scale(scale, w.shape, axis, spec.block_size) - w
    return float(np.sum((h @ d) * d))


def _correlated_inputs(n=4096, k=64):
    """Activations with a few outlier channels and correlations, like a transformer's hidden states."""
    x = RNG.normal(size=(n, k)) @ RNG.normal(size=(k, k)) * 0.3
    x[:, :3] *= 20
    gram = Gram()
    gram.update(x)
    return x, gram.mean


@pytest.mark.parametrize("spec", [QuantSpec("int4", "block", True, block_size=32, algorithm="gptq"),
                                  QuantSpec("int8", "channel", True, algorithm="gptq"),
                                  QuantSpec("int4", "block", True, block_size=32, algorithm="gptq", act_order=True)])
def test_gptq_beats_round_to_nearest_on_output_error(spec):
    _, h = _correlated_inputs()
    w = RNG.normal(size=(64, 48))
    q, scale, zp = gptq(w, h, spec)
    rtn_q = np.clip(np.rint(w / expand_scale(scale, w.shape, node_axis(spec), spec.block_size)), -8, 7) \
        if spec.dtype == "int4" else np.clip(np.rint(w / expand_scale(scale, w.shape, 1, None)), -127, 127)
    assert _h_error(q, scale, zp, w, h, spec) < 0.8 * _h_error(rtn_q, scale, zp, w, h, spec)


@pytest.mark.parametrize("spec", [QuantSpec("int4", "block", True, block_size=32, algorithm="gptq"),
                                  QuantSpec("int8", "channel", True, algorithm="gptq"),
                                  QuantSpec("int4", "block", True, block_size=32, algorithm="gptq", act_order=True)])
def test_gptq_knows_its_output_error_without_h_and_may_factor_h_in_place(spec):
    """The feedback errors' squares less lambda ||D||^2 are tr(D^T H D) (a dead input included); consuming H
    rounds to the same integers and leaves H's buffer as the factor (nothing copied beside it)."""
    x, _ = _correlated_inputs()
    x[:, 5] = 0.0
    gram = Gram()
    gram.update(x)
    h = gram.mean
    w = RNG.normal(size=(64, 48)).astype(np.float32)
    q, scale, zp, error = gptq_with_error(w, h, spec)
    assert error == pytest.approx(weighted_error(h, w, q, scale, zp, spec), rel=1e-4)
    consumed = h.copy()
    again = gptq_with_error(w, consumed, spec, consume=True)
    assert np.array_equal(again[0], q) and again[3] == pytest.approx(error, rel=1e-6)
    assert np.array_equal(consumed, h) == spec.act_order  # act-order permutes a copy: H stays as it was


def test_clip_search_never_worse_than_full_range():
    _, h = _correlated_inputs()
    w = RNG.standard_t(df=3, size=(64, 48))  # heavy tails: clipping pays off
    spec = QuantSpec("int4", "block", True, block_size=32, algorithm="awq")
    q, scale, zp, ratio = clip_search(w, h, spec)
    full_q, full_scale, full_zp, _ = clip_search(w, h, QuantSpec("int4", "block", True, block_size=32))  # first ratio 1.0
    assert ratio < 1.0
    assert _h_error(q, scale, zp, w, h, spec) <= _h_error(full_q, full_scale, full_zp, w, h, spec) + 1e-9


@pytest.fixture(scope="module")
def compiled(tiny_llama):
    recipes = {
        "rtn": "w4a16",
        "gptq": parse_recipe({"base": "w4a16", "name": "g", "weight": {"algorithm": "gptq"}}),
        "awq": parse_recipe({"base": "w4a16", "name": "a", "weight": {"algorithm": "awq"}}),
        "smooth": parse_recipe({"base": "w8a8", "name": "s", "smooth": {"alpha": 0.5}}),
    }
    # 4096 calibration tokens: GPTQ's H must be well estimated for K up to 688 input channels
    return {k: qtc.compile(tiny_llama, recipe=r, calib="zh-news", samples=16, seq_len=256, quiet=True) for k, r in recipes.items()}


def test_gptq_end_to_end_closer_to_float_than_rtn(compiled):
    cos = {k: r.report["heldout_comparison"]["outputs"]["logits"]["cosine"] for k, r in compiled.items()}
    assert cos["gptq"] > cos["rtn"]
    rounding = compiled["gptq"].report["rounding"]
    assert rounding["measured_on"].startswith("calibration statistics")
    layers = rounding["layers"]
    assert len(layers) == 28 and all(r["error_algorithm"] <= r["error_rtn"] for r in layers.values())


def test_awq_scales_fold_into_norm_weights(compiled):
    record = compiled["awq"].report["rounding"]["layers"]
    scales = {k: v for k, v in record.items() if k.endswith("(awq scale)")}
    assert scales and any(v["applied"] == "folded" for v in scales.values())


def test_smoothing_keeps_float_semantics(tiny_llama):
    """Channel scaling alone (weights left in float) must not change the float model's outputs."""
    from qtc.backends import get_backend
    from qtc.calibration.data import load_calibration
    from qtc.frontends.onnx_file import load_model
    from qtc.passes.annotate import AnnotateQuantizationPass
    from qtc.passes.calibrate import CollectLayerStatisticsPass
    from qtc.passes.smooth import SmoothActivationsPass

    recipe = parse_recipe({"base": "w8a8", "name": "s", "smooth": {"alpha": 0.8}})
    calib = load_calibration("zh-news", tokenizer=tiny_llama.parent / "tokenizer.json", n_samples=2, seq_len=64, seed=0)
    model = load_model(tiny_llama)
    AnnotateQuantizationPass(recipe)(model)
    CollectLayerStatisticsPass(calib, get_backend("cpu"), recipe.smooth, quiet=True)(model)
    SmoothActivationsPass(recipe.smooth)(model)
    assert len(model.meta["qtc.smoothing"]) == 16  # 4 distinct inputs per layer, 4 layers
    ids = np.arange(5, 69, dtype=np.int64).reshape(1, -1)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    smoothed = get_backend("cpu").session(model).run(["logits"], feed)[0]
    original = ort.InferenceSession(str(tiny_llama), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    np.testing.assert_allclose(smoothed, original, atol=2e-4, rtol=1e-4)


def test_smooth_recipe_compiles_and_agrees(compiled):
    report = compiled["smooth"].report
    assert report["heldout_comparison"]["outputs"]["logits"]["cosine"] > 0.99
    assert {v["alpha"] for v in report["smoothing"].values()} == {0.5}


def test_analyze_ranks_layers_and_names_noise_source(tiny_llama):
    result = qtc.analyze(tiny_llama, recipe="w8a8", calib="zh-news", samples=4, seq_len=128, quiet=True)
    layers = result["layers"]
    assert len(layers) == 28
    assert [r["sqnr_db"] for r in layers] == sorted(r["sqnr_db"] for r in layers)
    assert all(r["dominant_noise"] in ("weight", "activation") and "activation_range" in r for r in layers)
    assert layers[0]["module"].startswith("model.layers.")


def test_max_drop_keeps_sensitive_layers_until_budget_met(tiny_llama):
    strict = qtc.compile_within(tiny_llama, ("kl", 0.002), recipe="w4a16", calib="zh-news", samples=4, seq_len=128,
                                quiet=True)
    fallback = strict.report["fallback"]
    assert fallback["met"] and fallback["attempts"][-1]["drop"] <= 0.002
    assert fallback["attempts"][0]["kept_layers"] == 0 and fallback["attempts"][0]["drop"] > 0.002
    assert len(fallback["kept"]) == fallback["attempts"][-1]["kept_layers"] > 0


def test_smoothing_skips_weight_only_layers(tiny_llama):
    """Scaling the input of a weight-only layer relieves no activation rounding and only skews its weight rows."""
    from qtc.backends import get_backend
    from qtc.calibration.data import load_calibration
    from qtc.frontends.onnx_file import load_model
    from qtc.passes.annotate import AnnotateQuantizationPass
    from qtc.passes.calibrate import CollectLayerStatisticsPass
    from qtc.passes.smooth import SmoothActivationsPass

    recipe = parse_recipe({"base": "w8a8", "name": "s", "smooth": {"alpha": 0.5},
                           "overrides": [{"name": "*down_proj*", "recipe": "w8a16"}]})
    calib = load_calibration("zh-news", tokenizer=tiny_llama.parent / "tokenizer.json", n_samples=2, seq_len=64, seed=0)
    model = load_model(tiny_llama)
    AnnotateQuantizationPass(recipe)(model)
    CollectLayerStatisticsPass(calib, get_backend("cpu"), recipe.smooth, quiet=True)(model)
    SmoothActivationsPass(recipe.smooth)(model)
    assert len(model.meta["qtc.smoothing"]) == 12  # the 4 down_proj inputs are left alone


def test_max_drop_attempts_reuse_calibration_without_changing_the_result(tiny_llama):
    """Attempts after the first reuse the streamed statistics and ranges (a CalibrationCache); the model returned
    must be byte for byte the one a fresh compile of the reported fallback recipe gives."""
    from qtc.measure.mixed_precision import with_fallback

    base = parse_recipe({"base": "w8a8", "name": "w8a8-smooth", "smooth": {"alpha": 0.5}})
    options = {"calib": "zh-news", "samples": 4, "seq_len": 64, "quiet": True}
    within = qtc.compile_within(tiny_llama, ("kl", 1e-5), recipe=base, **options)
    fallback = within.report["fallback"]
    assert len(fallback["attempts"]) >= 3 and fallback["kept"]
    # the search reuses what the analysis streamed; a smoothed result is then compiled afresh
    assert [a["calibration"] for a in fallback["attempts"]] == ["reused"] * (len(fallback["attempts"]) - 1) + ["streamed"]
    fresh = qtc.compile(tiny_llama, with_fallback(base, [layer["node"] for layer in fallback["kept"]]), **options)
    assert fresh.report["heldout_comparison"] == within.report["heldout_comparison"]
    assert ir.to_proto(fresh.model).SerializeToString() == ir.to_proto(within.model).SerializeToString()


def test_max_drop_without_smoothing_returns_the_attempt_a_fresh_compile_would_give(tiny_llama):
    """Without smoothing or AWQ the reused statistics are the streamed ones: the search's own attempt is the
    result (no final recompile), byte for byte what a fresh compile of the reported fallback recipe gives."""
    from qtc.measure.mixed_precision import with_fallback

    options = {"calib": "zh-news", "samples": 4, "seq_len": 64, "quiet": True}
    within = qtc.compile_within(tiny_llama, ("kl", 3e-5), recipe="w8a8", **options)
    fallback = within.report["fallback"]
    assert fallback["met"] and fallback["kept"]
    assert all(a["calibration"] == "reused" for a in fallback["attempts"])
    # nothing kept misses, everything kept meets, then the doubling search finds the smallest set
    assert [a["kept_layers"] for a in fallback["attempts"]][:2] == [0, 28]
    assert fallback["attempts"][-1]["kept_layers"] == len(fallback["kept"]) < 28
    fresh = qtc.compile(tiny_llama, with_fallback(qtc.load_recipe("w8a8"), [layer["node"] for layer in fallback["kept"]]),
                        **options)
    assert ir.to_proto(fresh.model).SerializeToString() == ir.to_proto(within.model).SerializeToString()


def test_max_drop_stops_when_keeping_every_layer_misses_the_budget(tiny_llama):
    within = qtc.compile_within(tiny_llama, ("kl", 0.0), recipe="w8a8", calib="zh-news", samples=2, seq_len=64,
                                quiet=True)
    fallback = within.report["fallback"]
    assert not fallback["met"]
    assert [a["kept_layers"] for a in fallback["attempts"]] == [0, 28]
    assert len(fallback["kept"]) == 28


def test_smoothing_derives_min_max_ranges_from_the_statistics_pass(kv_decoder, monkeypatch):
    """SmoothQuant divides an activation's channels by s: the min/max range of X / s follows from X's per-channel
    range kept by the statistics pass, so the smoothed graph is not run again. Same ranges (to float rounding)
    and one calibration session instead of two."""
    from qtc.backends import base
    from qtc.passes import calibrate

    options = {"recipe": "w8a8-sq-down16", "calib": "zh-news", "samples": 2, "seq_len": 32, "quiet": True,
               "compare": False}
    opened = []
    original = base._inference_session
    monkeypatch.setattr(base, "_inference_session", lambda *args: opened.append(1) or original(*args))
    derived = qtc.compile(kv_decoder, **options)
    sessions = len(opened)
    opened.clear()
    monkeypatch.setattr(calibrate, "_derived_ranges", lambda model, wanted: {})
    streamed = qtc.compile(kv_decoder, **options)
    assert sessions == len(opened) - 1
    ours, theirs = derived.report["activation_ranges"], streamed.report["activation_ranges"]
    assert ours.keys() == theirs.keys() and derived.report["smoothing"]
    assert all(summary.get("derived") for summary in ours.values())
    for key, summary in theirs.items():
        assert ours[key]["count"] == summary["count"], key
        for bound in ("lo", "hi"):
            assert ours[key][bound] == pytest.approx(summary[bound], rel=1e-5, abs=1e-6), key


def test_layers_reading_one_activation_share_one_gptq_factor(kv_decoder, monkeypatch):
    """q/k/v (and gate/up) read one activation, so GPTQ's factor of its H is computed once for them, with the
    integers each layer gets on its own."""
    from qtc.passes import rounding

    factored = []
    original = rounding.inverse_cholesky
    monkeypatch.setattr(rounding, "inverse_cholesky", lambda *args, **kw: factored.append(1) or original(*args, **kw))
    options = {"recipe": "w4a8-gptq", "calib": "zh-news", "samples": 2, "seq_len": 32, "quiet": True}
    shared = qtc.compile(kv_decoder, **options)
    once = len(factored)
    gptq_layers = [r for r in shared.report["rounding"]["layers"].values() if r.get("algorithm") == "gptq"]
    factored.clear()
    monkeypatch.setattr(rounding, "_shared_factors", lambda h, chosen: {})
    apart = qtc.compile(kv_decoder, **options)
    assert len(factored) == len(gptq_layers) > once
    assert ir.to_proto(shared.model).SerializeToString() == ir.to_proto(apart.model).SerializeToString()


def test_max_drop_lets_an_attempt_it_will_not_return_go_before_the_next(tiny_llama, monkeypatch):
    """Each attempt is a whole compiled model: holding a missed one while the next compiles put --max-drop's peak
    RSS above ORT's on gemma-3-270m (7.15 GB). An unmeetable budget: nothing kept misses, everything kept misses."""
    import gc
    import weakref

    import qtc.api

    attempts, alive = [], []
    original = qtc.api.compile

    def compile_and_watch(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in attempts))
        result = original(*args, **kwargs)
        attempts.append(weakref.ref(result))
        return result

    monkeypatch.setattr(qtc.api, "compile", compile_and_watch)
    result = qtc.compile_within(tiny_llama, ("kl", 0.0), recipe="w4a16", calib="zh-news", samples=2, seq_len=32,
                                quiet=True)
    assert [a["kept_layers"] > 0 for a in result.report["fallback"]["attempts"]] == [False, True]
    assert alive == [0, 0]
