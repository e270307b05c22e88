"""qtc's KV exports fused for cpu (RMSNorm, rotary, cached attention -> GroupQueryAttention): same logits and
presents as the unfused graph, prefill and decode;
sliding-window layers with the kernel's local_window_size; refused (with the reason) where the mask is not a causal one from
attention_mask."""

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qtc.calibration.data import model_inputs, next_step_feed, text_feed
from qtc.frontends.decoder import DecoderConfig, build_decoder
from qtc.models.synthetic import RandomWeights
from qtc.passes.canonicalize import canonicalize_passes
from qtc.passes.fusion import FuseOperatorsPass, fusion_counts
from qtc.passes.gqa_fusion import causal_mask_window

TINY = DecoderConfig(family="llama", vocab_size=96, hidden=64, layers=3, heads=4, kv_heads=2, intermediate=96,
                     head_size=16, sliding_window=3, sliding_layers=(0, 2))


def _model(cfg: DecoderConfig, fuse: bool) -> ir.Model:
    model = ir.from_proto(build_decoder(cfg, RandomWeights(cfg, seed=3)))
    ir.passes.PassManager(canonicalize_passes(21))(model)
    if fuse:
        FuseOperatorsPass("cpu")(model)
    return model


def _session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _decode(model: ir.Model, prompt: np.ndarray, steps: int) -> list[dict[str, np.ndarray]]:
    """Prefill `prompt`, then `steps` greedy single-token steps; every run's outputs by name."""
    session, inputs = _session(model), model_inputs(model)
    names = [o.name for o in session.get_outputs()]
    feed = text_feed(prompt, inputs)
    runs = [dict(zip(names, session.run(None, feed)))]
    position = prompt.size
    for _ in range(steps):
        token = np.array([[int(runs[-1]["logits"][0, -1].argmax())]], np.int64)
        feed = next_step_feed(feed, runs[-1], token, position, inputs)
        runs.append(dict(zip(names, session.run(None, feed))))
        position += 1
    return runs


@pytest.mark.parametrize(("window", "prompt_length"), [(None, 7), (3, 7), (3, 2), (5, 3)])
def test_gqa_matches_the_standard_graph_through_prefill_and_decode(window, prompt_length):
    """A windowed layer's cache goes from a preallocated buffer (total within the window) to the valid rows (past
    it): prompts longer and shorter than the window, decoding across it."""
    cfg = dataclasses.replace(TINY, sliding_window=window, sliding_layers=TINY.sliding_layers if window else ())
    fused, plain = _model(cfg, fuse=True), _model(cfg, fuse=False)
    fused_layers = cfg.layers  # windowed layers (0 and 2) too, with local_window_size
    assert fusion_counts(fused)["fusions"]["gqa"]["in_graph"] == fused_layers
    assert sum(n.op_type == "Softmax" for n in fused.graph) == cfg.layers - fused_layers
    # the exporter's rotary (Slice on axis 3 with steps, Cast(Unsqueeze(position_ids))) and RMSNorm forms fuse too;
    # a GroupQueryAttention layer's Q/K/V become one packed MatMul and the attention rotates Q and K itself
    assert fusion_counts(fused)["fusions"]["qkv_pack"]["applied"] == fused_layers
    assert sum(n.op_type == "RotaryEmbedding" for n in fused.graph) == 2 * (cfg.layers - fused_layers)
    weight_matmuls = [n for n in fused.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert len(weight_matmuls) == 7 * cfg.layers + 1 - 2 * fused_layers
    attentions = [n for n in fused.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.attributes.get_int("do_rotary", 0) for n in attentions)
    windows = [n.attributes.get_int("local_window_size", -1) for n in attentions]
    assert windows == ([window, -1, window] if window else [-1] * cfg.layers)
    assert [n.attributes.get_int("sliding_window_cache", 0) for n in attentions] == [int(w > 0) for w in windows]
    assert not [n for n in fused.graph if n.op_type in ("ReduceMean", "Neg", "Slice")]
    # both residual Adds of every layer and the final norm's fuse (only the first layer's input norm has no skip)
    ops = [n.op_type for n in fused.graph]
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * cfg.layers and ops.count("SimplifiedLayerNormalization") == 1
    prompt = np.array([5, 17, 42, 8, 61, 3, 29], np.int64)[:prompt_length]
    for got, want in zip(_decode(fused, prompt, 4), _decode(plain, prompt, 4), strict=True):
        assert sorted(got) == sorted(want)
        for name in want:
            expected = want[name]
            if name.startswith("present") and window and int(name.split(".")[1]) in cfg.sliding_layers:
                # a windowed cache: W rows, the most recent positions first (ORT's layout for capacity W:
                # L = min(T, W) rows resident at [0, L)); the source keeps every position
                resident = min(expected.shape[2], window)
                assert got[name].shape[2] == window
                got[name], expected = got[name][:, :, :resident], expected[:, :, -resident:]
            np.testing.assert_allclose(got[name], expected, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("prompt_length", [2, 7])
def test_a_window_without_a_windowed_cache_is_fed_both_cache_forms(prompt_length):
    """A GroupQueryAttention window over a full-length cache (another exporter's form, no sliding_window_cache):
    the feed loop gives it the zero buffer while the sequence fits in the window and the valid rows after
    (calibration/data.fit_past), and it computes what the source does: a prefill, a 3-token chunk that runs past
    the window (a partly valid buffer must shrink to its valid rows), then decode steps."""
    cfg = dataclasses.replace(TINY, sliding_window=3)
    fused, plain = _model(cfg, fuse=True), _model(cfg, fuse=False)
    for node in fused.graph:
        if node.op_type == "GroupQueryAttention":
            node.attributes.pop("sliding_window_cache", None)
    ids = np.array([5, 17, 42, 8, 61, 3, 29, 11, 70, 2, 33, 9], np.int64)
    logits = []
    for model in (fused, plain):
        session, inputs = _session(model), model_inputs(model)
        names = [o.name for o in session.get_outputs()]
        feed = text_feed(ids[:prompt_length], inputs)
        runs = [dict(zip(names, session.run(None, feed)))]
        for start, end in ((prompt_length, prompt_length + 3), (prompt_length + 3, prompt_length + 4)):
            feed = next_step_feed(feed, runs[-1], ids[None, start:end], start, inputs)
            runs.append(dict(zip(names, session.run(None, feed))))
        logits.append([run["logits"] for run in runs])
    for got, want in zip(*logits, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


GEMMA_LIKE = dataclasses.replace(TINY, norm_offset=1.0, qk_norm=True, embed_scale=8.0, mlp_act="gelu_tanh",
                                 sandwich_norms=True, tied=True, rope_local_theta=10000.0, rope_theta=1e6,
                                 sliding_window=4, sliding_layers=(0, 2))


@pytest.mark.parametrize("prompt_length", [3, 7])
def test_per_head_norms_keep_no_transposes_and_rotate_inside_the_attention(prompt_length):
    """Gemma 3's q_norm / k_norm between the projections and the rotation: the norms run on the [batch, seq,
    heads, head_size] view, GroupQueryAttention rotates and Q/K/V are one packed MatMul (the GenAI builder's
    form); same logits and caches."""
    fused, plain = _model(GEMMA_LIKE, fuse=True), _model(GEMMA_LIKE, fuse=False)
    assert fusion_counts(fused)["fusions"]["gqa_normed_rotary"]["applied"] == GEMMA_LIKE.layers
    assert fusion_counts(fused)["fusions"]["qkv_pack_normed"]["applied"] == GEMMA_LIKE.layers
    weight_matmuls = [n for n in fused.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert len(weight_matmuls) == 5 * GEMMA_LIKE.layers + 1  # q/k/v packed: one MatMul and a Split
    assert sum(n.op_type == "Split" for n in fused.graph) == GEMMA_LIKE.layers
    attentions = [n for n in fused.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.attributes.get_int("do_rotary", 0) for n in attentions)
    assert not [n for n in fused.graph if n.op_type in ("Transpose", "RotaryEmbedding")]
    prompt = np.array([5, 17, 42, 8, 61, 3, 29], np.int64)[:prompt_length]
    for got, want in zip(_decode(fused, prompt, 4), _decode(plain, prompt, 4), strict=True):
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4)
        for layer in range(GEMMA_LIKE.layers):  # the full-attention layer's cache is the source's, bit for bit
            name = f"present.{layer}.key"
            rows = min(want[name].shape[2], 4) if layer in GEMMA_LIKE.sliding_layers else want[name].shape[2]
            np.testing.assert_allclose(got[name][:, :, :rows], want[name][:, :, want[name].shape[2] - rows:],
                                       atol=1e-4, err_msg=name)


def test_a_bias_not_from_attention_mask_is_refused_with_the_reason():
    model = _model(TINY, fuse=False)
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    bias = softmax.inputs[0].producer().inputs[1]
    assert causal_mask_window(bias, model)[:2] == (True, 3)
    mask = next(v for v in model.graph.inputs if v.name == "attention_mask")
    mask.name = "padding"  # the graph now has no input to take sequence lengths from
    assert causal_mask_window(bias, model) == (False, None,
                                               "the model has no attention_mask input to take sequence lengths from")


def test_float_recipe_is_the_fused_float_decoder(kv_decoder):
    import qtc

    result = qtc.compile(kv_decoder, recipe="float", calib="zh-news", samples=2, seq_len=64)
    assert result.report["fusions"]["fusions"]["gqa"]["in_graph"] == 4  # zh-tiny-lm: 4 layers
    assert not any(n.domain == "" and n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in result.model.graph)
    logits = result.report["heldout_comparison"]["outputs"]["logits"]
    assert logits["cosine"] > 0.99999 and logits["top1_agreement"] == 1.0


def test_packed_attention_takes_a_chunk_after_the_prefill_like_the_standard_graph():
    """A multi-token step on a cache (chunked prefill, `qtc eval`'s second half): the packed attention rotates at
    the positions the model is fed, not ones it infers."""
    cfg = dataclasses.replace(TINY, sliding_window=None, sliding_layers=())
    results = []
    for fuse in (True, False):
        model = _model(cfg, fuse)
        session, inputs = _session(model), model_inputs(model)
        names = [o.name for o in session.get_outputs()]
        first = dict(zip(names, session.run(None, text_feed(np.array([5, 17, 42, 8], np.int64), inputs))))
        feed = {"input_ids": np.array([[61, 3, 29]], np.int64), "attention_mask": np.ones((1, 7), np.int64),
                "position_ids": np.array([[4, 5, 6]], np.int64)}
        feed |= {spec.name: first[spec.present] for spec in inputs if spec.present is not None}
        results.append(dict(zip(names, session.run(None, feed))))
    for name in results[1]:
        np.testing.assert_allclose(results[0][name], results[1][name], atol=1e-5, err_msg=name)


def test_a_recipe_naming_a_projection_keeps_q_k_v_apart(kv_decoder):
    import qtc
    from qtc.recipes import parse_recipe

    packed = qtc.compile(kv_decoder, recipe="w8a16")
    apart = qtc.compile(kv_decoder, recipe=parse_recipe({"base": "w8a16", "name": "k-float",
                                                         "overrides": [{"name": "*k_proj*", "quantize": False}]}))
    assert packed.report["fusions"]["fusions"]["qkv_pack"]["in_graph"] == 4
    assert apart.report["fusions"]["fusions"]["qkv_pack"]["applied"] == 0
    assert apart.report["fusions"]["fusions"]["gqa"]["in_graph"] == 4
    float_k = [n for n in apart.model.graph if n.op_type == "MatMul" and "k_proj" in n.name]
    assert len(float_k) == 4  # the override still finds its layers, and keeps them float


def test_npz_calibration_saved_for_the_source_feeds_windowed_caches(tmp_path):
    """.npz prefills written for the source (empty pasts of 0 rows, what its own session takes) calibrate the
    fused graph, whose windowed caches take W-row buffers: each past is adapted, as text windows are."""
    import onnx

    import qtc

    source = tmp_path / "source" / "model.onnx"
    source.parent.mkdir()
    onnx.save(build_decoder(TINY, RandomWeights(TINY, seed=3)), source)
    inputs = model_inputs(ir.load(source))
    rng = np.random.default_rng(0)
    for i in range(11):
        np.savez(tmp_path / f"{i:02d}.npz", **text_feed(rng.integers(0, TINY.vocab_size, 8), inputs))
    result = qtc.compile(source, recipe="w8a8", calib=tmp_path, quiet=True)
    assert any(n.attributes.get_int("local_window_size", -1) == 3 for n in result.model.graph
               if n.op_type == "GroupQueryAttention")
    assert result.report["heldout_comparison"]["samples"] == 1
    assert result.report["heldout_comparison"]["outputs"]["logits"]["cosine"] > 0.99
