"""Legalization for cann: fused or contrib ops become whitelisted primitives with the same outputs (ORT CPU), what
cannot be legalized is refused unless CPU fallback is allowed, and the compiled graph's placement is inspected."""

import json

import numpy as np
import onnx_ir as ir
import pytest

import qtc
from qtc.backends.cann import GRAPH_WHITELIST, QDQ_OPS, placement
from qtc.errors import QtcError
from qtc.passes.fusion import FuseOperatorsPass, fusion_counts
from qtc.passes.legalize import legalization_passes
from tests import graphs
from tests.cli.test_main import qtc as run_cli
from tests.passes.test_fusion import TOLERANCE, canonical, heldout_feeds


def _run(model: ir.Model, feed: dict) -> np.ndarray:
    return graphs.run(model, feed)[0]


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


def test_isnan_becomes_not_equal_and_keeps_its_values():
    """Default transformers (sdpa) exports put IsNaN in the attention mask; CANN's graph mode has Equal and Not."""
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("IsNaN", ["x"], ["n"]), helper.make_node("Where", ["n", "z", "x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    x = {"x": np.array([1.0, np.nan, -np.inf, 0.0], np.float32)}
    before = graphs.run(model, x)
    ir.passes.PassManager(legalization_passes())(model)
    assert [n.op_type for n in model.graph] == ["Equal", "Not", "Where"]
    assert all(n.op_type in GRAPH_WHITELIST for n in model.graph)
    np.testing.assert_array_equal(graphs.run(model, x)[0], before[0])
    assert model.meta["qtc.legalization"]["decomposed"] == {"IsNaN": 1}
