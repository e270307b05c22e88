"""Segmented calibration: run slice by slice, the observers see the same activations in the same order as the
flat run (a KV decoder's prefill and decode steps included), while no segment holds more than its share of the
weights."""

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from qtc.backends import compile_target
from qtc.calibration.data import load_calibration
from qtc.frontends.onnx_file import load_model
from qtc.passes.annotate import AnnotateQuantizationPass, activations_to_observe
from qtc.passes.calibrate import stream_activations
from qtc.passes.canonicalize import canonicalize_passes
from qtc.passes.fusion import FuseOperatorsPass
from qtc.passes.segments import split_segments, stream_segmented
from qtc.recipes import builtin_recipe


@pytest.fixture(scope="module")
def prepared(kv_decoder):
    model = load_model(kv_decoder)
    ir.passes.PassManager([*canonicalize_passes(21), FuseOperatorsPass("cpu"), AnnotateQuantizationPass(builtin_recipe("w8a8"))])(model)
    calib = load_calibration("zh-news", tokenizer=kv_decoder.parent / "tokenizer.json", n_samples=3, seq_len=32, seed=0)
    names = {value.name for value, _ in activations_to_observe(model.graph).values()}
    return model, calib, names


def _collect(stream, names):
    seen = {name: [] for name in names}
    for produced in stream:
        for name, array in produced.items():
            seen[name].append(array)
    return seen


def test_segments_cut_by_weight_bytes_and_read_only_what_crosses(prepared):
    model, _, names = prepared
    segments = split_segments(model.graph, 2 << 20, names)
    assert len(segments) >= 5
    assert all(s.weight_bytes <= 2 << 20 or len([n for n in s.nodes if n.inputs]) == 1 for s in segments)
    # every node once, but the LM head: nothing observed or read later needs the logits
    placed = [n for s in segments for n in s.nodes]
    assert len(placed) == len(set(placed))
    assert [n.op_type for n in model.graph if n not in placed] == ["MatMul"]
    assert next(n for n in model.graph if n not in placed).outputs[0].name == "logits"
    # the residual stream and the shared mask / rotary values cross a cut; the whole activation set does not
    assert max(len(s.inputs) for s in segments[1:]) < 40


def test_state_held_for_an_observed_value_counts_against_its_producers_segment(prepared):
    """A layer input's Gram (K x K) can outweigh the layer: it ends the segment producing it, whatever the weights."""
    model, _, names = prepared
    observed = sorted(names - {v.name for v in model.graph.inputs})[0]
    producer = next(n for n in model.graph if any(v.name == observed for v in n.outputs))
    plain = split_segments(model.graph, 2 << 20, names)
    held = split_segments(model.graph, 2 << 20, names, held={observed: 2 << 20})
    alone = next(s for s in held if producer in s.nodes)
    assert len(held) > len(plain) and alone.nodes == [producer]


def test_segmented_stream_equals_the_flat_stream(prepared):
    model, calib, names = prepared
    backend = compile_target("cpu")
    flat = _collect(stream_activations(model, backend, calib, names, "flat", quiet=True), names)
    cut = _collect(stream_segmented(model, backend, calib, names, 2 << 20, "segmented", quiet=True), names)
    assert sorted(flat) == sorted(cut)
    runs = 3 + 4  # each window's prefill, then 4 decode steps of the three windows as one batch
    for name in names:
        assert len(flat[name]) == len(cut[name]) == runs, name
        for a, b in zip(flat[name], cut[name]):
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4, err_msg=name)


def test_a_memory_limit_below_the_flat_session_segments_calibration_and_writes_the_same_bytes(kv_decoder, tmp_path):
    import qtc

    written = {}
    for limit in (64 << 30, 60 << 20):  # zh-tiny-lm: 20 MB of weights; 60 MB -> slices of 6 MB
        result = qtc.compile(kv_decoder, recipe="w8a8", calib="zh-news", samples=2, seq_len=48, memory_limit=limit)
        assert ("segmented_calibration" in result.report) == (limit < 1 << 30)
        path = result.save(tmp_path / str(limit) / "model.onnx")
        written[limit] = (path.read_bytes(), path.with_name("model.onnx.data").read_bytes())
    assert written[64 << 30] == written[60 << 20]


@pytest.mark.parametrize("recipe", ["w4a8-gptq", "w4a16-mlp8-awq"])
def test_segmented_gptq_and_awq_round_the_same_as_flat(kv_decoder, tmp_path, recipe):
    """GPTQ rounds each segment's groups as their statistics finish and writes no Gram to scratch; AWQ (which
    rescales weights later segments read) offloads its Grams and rounds after calibration. Same bytes as flat."""
    import qtc
    from qtc.passes.meta import GRAM_DIR

    written = {}
    for limit in (64 << 30, 60 << 20):
        result = qtc.compile(kv_decoder, recipe=recipe, calib="zh-news", samples=2, seq_len=48, memory_limit=limit)
        path = result.save(tmp_path / str(limit) / "model.onnx")
        written[limit] = path.with_name("model.onnx.data").read_bytes()
        used = {layer.get("used") for layer in result.report["rounding"]["layers"].values()}
        assert recipe.split("-")[-1] in used
        if limit == 60 << 20:
            scratch = list(Path(result.model.meta[GRAM_DIR].name).glob("*.npy"))
            assert (scratch == []) == (recipe == "w4a8-gptq")
    assert written[64 << 30] == written[60 << 20]


def test_segmented_gptq_refuses_up_front_when_the_scratch_disk_is_too_small(kv_decoder, monkeypatch):
    import shutil
    from collections import namedtuple

    import qtc
    from qtc.errors import QtcError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))  # a full disk
    with pytest.raises(QtcError, match="scratch space for its X\\^T X matrices .* set TMPDIR"):
        qtc.compile(kv_decoder, recipe="w4a16-mlp8-awq", calib="zh-news", samples=1, seq_len=32, memory_limit=60 << 20)


def test_a_quantized_rerun_feeds_later_segments_what_the_substituted_weights_compute(prepared):
    """Sequential GPTQ's stream: a segment's own activations come from its float weights; every later segment's
    from the segment re-run with the substituted weights (here the first large weight halved), exactly what the
    flat graph with that weight halved computes."""
    model, calib, names = prepared
    backend = compile_target("cpu")
    segments = split_segments(model.graph, 2 << 20, names)
    weight = next(w for w in segments[1].weights if w.const_value.nbytes > 1 << 16)
    own = {v.name for v in segments[1].outputs} & names
    halved = lambda value: value.const_value.numpy() * 0.5 if value is weight else None  # noqa: E731
    cut = _collect(stream_segmented(model, backend, calib, names, 2 << 20, "sequential", quiet=True,
                                    quantized=halved), names)
    flat = _collect(stream_activations(model, backend, calib, names, "flat", quiet=True), names)
    original = weight.const_value
    weight.const_value = ir.tensor(original.numpy() * 0.5, name=weight.name)
    try:
        changed = _collect(stream_activations(model, backend, calib, names, "changed", quiet=True), names)
    finally:
        weight.const_value = original
    later = {v.name for s in segments[2:] for v in s.outputs} & names
    assert later and own
    for name in sorted(names):
        expected = flat[name] if name not in later else changed[name]
        for a, b in zip(expected, cut[name]):
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4, err_msg=name)
    moved = [name for name in later if not all(np.allclose(a, b) for a, b in zip(flat[name], changed[name]))]
    assert moved  # the halved weight reaches later segments (or the test would not tell the two apart)


def test_sequential_gptq_rounds_from_quantized_upstream_and_says_so(kv_decoder, tmp_path):
    import dataclasses

    import qtc
    from qtc.recipes import load_recipe

    base = load_recipe("w4a8-gptq")
    sequential = dataclasses.replace(base, name="w4a8-gptq-seq", weight=dataclasses.replace(base.weight, sequential=True))
    flat = qtc.compile(kv_decoder, recipe=base, calib="zh-news", samples=2, seq_len=48)
    seq = qtc.compile(kv_decoder, recipe=sequential, calib="zh-news", samples=2, seq_len=48)
    assert seq.report["segmented_calibration"]["sequential_gptq"] is True
    assert "segmented_calibration" not in flat.report
    layers = seq.report["rounding"]["layers"]
    assert {layer.get("used") for layer in layers.values()} >= {"gptq"}
    # the first layer's statistics are the same either way; later layers' come from a quantized upstream
    errors = {name: (flat.report["rounding"]["layers"][name]["error_algorithm"], layer["error_algorithm"])
              for name, layer in layers.items() if "error_algorithm" in layer}
    assert any(abs(a - b) > 1e-6 * max(abs(a), 1e-12) for a, b in errors.values())
    path = seq.save(tmp_path / "seq" / "model.onnx")
    assert qtc.compile(kv_decoder, recipe=sequential, calib="zh-news", samples=2, seq_len=48).save(
        tmp_path / "again" / "model.onnx").with_name("model.onnx.data").read_bytes() == \
        path.with_name("model.onnx.data").read_bytes()


def test_sequential_is_a_gptq_option_and_refuses_smoothing(kv_decoder):
    import dataclasses

    import qtc
    from qtc.errors import QtcError
    from qtc.recipes import QuantSpec, load_recipe

    with pytest.raises(QtcError, match="sequential is a GPTQ option"):
        QuantSpec(dtype="int4", granularity="block", block_size=32, algorithm="awq", sequential=True)
    assert "sequential" not in QuantSpec(algorithm="gptq").to_dict()  # recipes compiled before it keep their bytes
    assert QuantSpec(algorithm="gptq", sequential=True).to_dict()["sequential"] is True
    smoothed = load_recipe("w8a8-sq-down16")
    smoothed = dataclasses.replace(smoothed, weight=dataclasses.replace(smoothed.weight, algorithm="gptq", sequential=True))
    with pytest.raises(QtcError, match="cannot be combined with smoothing"):
        qtc.compile(kv_decoder, recipe=smoothed, calib="zh-news", samples=1, seq_len=32)


def test_a_tied_head_transposes_the_table_in_its_own_segment():
    """A node computed from weights alone (the tied head's Transpose of the embedding table) runs in its reader's
    segment: its output would otherwise be carried across segments once per calibration run."""
    from qtc.frontends.decoder import DecoderConfig, build_decoder
    from qtc.models.synthetic import RandomWeights

    cfg = DecoderConfig(family="llama", vocab_size=4000, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96,
                        head_size=16, tied=True)
    model = ir.from_proto(build_decoder(cfg, RandomWeights(cfg, seed=1)))
    ir.passes.PassManager(canonicalize_passes(21))(model)
    table_readers = [node for node in model.graph if any(v is not None and v.is_initializer()
                                                         and v.const_value.shape == (4000, 64) for v in node.inputs)]
    assert any(node.op_type == "Transpose" for node in table_readers)  # the form this test is about
    segments = split_segments(model.graph, 1 << 16, {v.name for v in model.graph.outputs})
    crossing = [v for s in segments for v in s.inputs if v.producer() is not None]
    assert all(v.shape is None or 4000 not in tuple(v.shape) for v in crossing)
    assert sum(len(s.nodes) for s in segments) == len(list(model.graph))
    order = [node for s in segments for node in s.nodes]
    assert all(order.index(v.producer()) < order.index(node) for node in order for v in node.inputs
               if v is not None and v.producer() is not None)  # still topological
