"""Weight-only int8 layers on the cpu target: stored int8, expanded to float32 at session load (passes/weightonly.py),
computing what DequantizeLinear -> MatMul computes, and never reaching ORT's per-call 8-bit MatMulNBits."""

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qtc
from qtc.measure.inspection import inspect_model
from qtc.models.reference import build_reference
from qtc.passes.weightonly import ExpandInt8WeightsPass, why_not

K, N = 64, 48


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _layer(weight_dtype: np.dtype, zero_point: bool, activation_dq: bool = False, block: bool = False) -> ir.Model:
    """x -> [Q -> DQ ->] MatMul(x, DequantizeLinear(w)) with per-output-channel scales (axis 1) or blocks along K."""
    rng = np.random.default_rng(0)
    info = np.iinfo(weight_dtype)
    q = rng.integers(info.min, info.max, (K, N), endpoint=True).astype(weight_dtype)
    scale = rng.uniform(0.001, 0.01, (K // 16, N) if block else (N,)).astype(np.float32)
    inputs = [ir.Value(name="w", const_value=ir.tensor(q, name="w")), ir.Value(name="s", const_value=ir.tensor(scale, name="s"))]
    if zero_point:
        zp = rng.integers(-5, 5, scale.shape).astype(weight_dtype) + (128 if weight_dtype == np.uint8 else 0)
        inputs.append(ir.Value(name="z", const_value=ir.tensor(zp.astype(weight_dtype), name="z")))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, K]))
    attributes = {"axis": 0, "block_size": 16} if block else {"axis": 1}
    dq = ir.node("DequantizeLinear", inputs, attributes, name="w_DequantizeLinear", outputs=[ir.Value(name="w_dq")])
    nodes, a = [dq], x
    if activation_dq:
        xs = ir.Value(name="xs", const_value=ir.tensor(np.array(0.05, np.float32), name="xs"))
        xz = ir.Value(name="xz", const_value=ir.tensor(np.array(128, np.uint8), name="xz"))
        quantize = ir.node("QuantizeLinear", [x, xs, xz], outputs=[ir.Value(name="xq")])
        dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], xs, xz], outputs=[ir.Value(name="xd")])
        nodes += [quantize, dequantize]
        a = dequantize.outputs[0]
    matmul = ir.node("MatMul", [a, dq.outputs[0]], outputs=[ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT))])
    constants = {v.name: v for n in nodes for v in n.inputs if v.const_value is not None}
    graph = ir.Graph([x], matmul.outputs, nodes=[*nodes, matmul], initializers=list(constants.values()),
                     opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("dtype,zero_point", [(np.int8, False), (np.int8, True), (np.uint8, True)])
def test_expanded_weight_computes_what_dequantize_linear_computes(dtype, zero_point):
    x = np.random.default_rng(1).standard_normal((2, K)).astype(np.float32)
    model = _layer(dtype, zero_point)
    q, scale, *zp = (v.const_value.numpy() for v in model.graph.node("w_DequantizeLinear").inputs)
    # DequantizeLinear's definition, in numpy (ORT itself would run this graph as MatMulNBits, int8 activations)
    reference = x @ ((q.astype(np.float32) - (zp[0].astype(np.float32) if zp else 0)) * scale)
    assert ExpandInt8WeightsPass()(model).modified
    ops = [node.op_type for node in model.graph]
    assert "DequantizeLinear" not in ops and ops.count("Cast") == 1
    assert model.graph.initializers["w"].const_value.dtype == ir.DataType.from_numpy(np.dtype(dtype))  # stays 8-bit
    np.testing.assert_allclose(_run(model, x), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case,reason", [
    ({"activation_dq": True}, "read by something other than a weight-only GEMM"),
    ({"block": True}, "block-quantized"),
])
def test_integer_kernel_and_block_weights_keep_dequantize_linear(case, reason):
    model = _layer(np.uint8 if case.get("activation_dq") else np.int8, False, **case)
    dq = model.graph.node("w_DequantizeLinear")
    assert reason in why_not(dq)
    assert not ExpandInt8WeightsPass()(model).modified
    assert model.graph.node("w_DequantizeLinear") is dq


@pytest.fixture(scope="module")
def zh_tiny_lm() -> Path:
    return build_reference("zh-tiny-lm")


def test_w8a16_on_cpu_runs_float_matmuls_over_int8_storage(zh_tiny_lm, tmp_path):
    result = qtc.compile(zh_tiny_lm, recipe="w8a16", quiet=True)
    path = result.save(tmp_path / "w8a16.onnx")
    ops = result.report["runtime_ops"]["ops"]
    assert "com.microsoft::MatMulNBits" not in ops and "DequantizeLinear" not in ops
    assert result.report["compiled"]["expanded_int8_weights"] == 28  # q, k, v, o, gate, up, down x 4 layers
    assert any("expanded to float32 once at session load" in note for note in result.report["target_notes"])
    assert inspect_model(path)["weights_quantized"]["fraction"] > 0.5  # the int8 weights still count as quantized
    float_session = ort.InferenceSession(str(zh_tiny_lm), providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.arange(5, 69, dtype=np.int64).reshape(1, -1)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    want, got = float_session.run(["logits"], feed)[0], session.run(["logits"], feed)[0]
    cosine = float((want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got))
    assert cosine > 0.9999 and not np.array_equal(want, got)  # int8-rounded weights: close to float, not float


def test_cuda_target_keeps_the_portable_dequantize_form(zh_tiny_lm):
    result = qtc.compile(zh_tiny_lm, recipe="w8a16", target="cuda", quiet=True, compare=False)
    assert result.report["compiled"]["expanded_int8_weights"] == 0
    assert sum(node.op_type == "DequantizeLinear" for node in result.model.graph) == 28
