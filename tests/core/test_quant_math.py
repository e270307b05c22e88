"""Quantization arithmetic, checked against ONNX Runtime's own QuantizeLinear/DequantizeLinear."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qtc.core import quant_math
from qtc.core.quant_math import (
    activation_qparams,
    dequantize_array,
    quantize_array,
    weight_qparams,
)
from qtc.recipes import QuantSpec

RNG = np.random.default_rng(0)


def _ort_qdq(x, scale, zero_point, axis):
    """Run QuantizeLinear -> DequantizeLinear at opset 21 through ORT CPU."""
    values = [ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(x.shape))]
    s = ir.Value(name="s", const_value=ir.tensor(scale))
    z = ir.Value(name="z", const_value=ir.tensor(zero_point))
    attrs = {"axis": axis} if axis is not None else {}
    q = ir.node("QuantizeLinear", [values[0], s, z], attrs)
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], attrs)
    dq.outputs[0].name = "y"
    graph = ir.Graph(values, dq.outputs, nodes=[q, dq], initializers=[s, z], opset_imports={"": 21})
    proto = ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_per_channel_weight_matches_ort_and_error_bound():
    w = RNG.normal(size=(64, 32)).astype(np.float32) * np.linspace(0.01, 3, 32, dtype=np.float32)
    q, scale, zp = weight_qparams(w, QuantSpec("int8", "channel", True), axis=1)
    assert q.dtype == np.int8 and scale.shape == (32,) and not zp.any()
    assert q.min() >= -127  # restricted symmetric range
    ours = dequantize_array(q, scale, zp, axis=1)
    assert np.all(np.abs(ours - w) <= scale / 2 + 1e-7)
    np.testing.assert_allclose(_ort_qdq(w, scale, zp, axis=1), ours, rtol=0, atol=1e-6)


def test_asymmetric_activation_range_contains_zero_exactly():
    scale, zp = activation_qparams(0.5, 6.0, QuantSpec("int8", "tensor", False, calibrator="minmax"))
    assert dequantize_array(zp.astype(np.int8), scale, zp, None) == 0.0  # 0 is widened in and exact
    x = RNG.uniform(0, 6, size=(4, 100)).astype(np.float32)
    np.testing.assert_allclose(_ort_qdq(x, scale, zp, None), dequantize_array(quantize_array(x, scale, zp, None, "int8"), scale, zp, None), atol=1e-6)
    assert np.max(np.abs(_ort_qdq(x, scale, zp, None) - x)) <= scale / 2 + 1e-6


def test_zero_channel_gets_valid_scale():
    w = np.zeros((8, 4), dtype=np.float32)
    w[:, 0] = 1.0
    q, scale, _ = weight_qparams(w, QuantSpec("int8", "channel", True), axis=1)
    assert np.all(scale > 0) and not q[:, 1:].any()


def test_rounding_is_half_to_even_like_onnx():
    scale, zp = np.float32(1.0), np.int8(0)
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5]], dtype=np.float32)
    np.testing.assert_array_equal(quantize_array(x, np.array(scale), np.array(zp), None, "int8"), [[0, 2, 2, 0, -2]])
    np.testing.assert_array_equal(_ort_qdq(x, np.array(scale), np.array(zp), None), [[0, 2, 2, 0, -2]])


def _ort_dequantize_blocks(q, scale, axis, block):
    import ml_dtypes

    qv = ir.Value(name="q", const_value=ir.tensor(q.astype(ml_dtypes.int4)))
    s = ir.Value(name="s", const_value=ir.tensor(scale))
    dq = ir.node("DequantizeLinear", [qv, s], {"axis": axis, "block_size": block})
    dq.outputs[0].name = "y"
    graph = ir.Graph([], dq.outputs, nodes=[dq], initializers=[qv, s], opset_imports={"": 21})
    proto = ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {})[0]


def test_int4_blocks_match_ort_dequantize_including_ragged_last_block():
    w = RNG.normal(size=(80, 24)).astype(np.float32)  # K=80 is not a multiple of 32: last block has 16 rows
    spec = QuantSpec("int4", "block", True, block_size=32)
    q, scale, zp = weight_qparams(w, spec, axis=0)
    assert q.shape == w.shape and scale.shape == (3, 24) and not zp.any()
    assert q.min() >= -7 and q.max() <= 7
    ours = np.repeat(scale, 32, axis=0)[:80] * q
    np.testing.assert_allclose(_ort_dequantize_blocks(q, scale, 0, 32), ours, atol=1e-6)
    assert np.all(np.abs(ours - w) <= np.repeat(scale, 32, axis=0)[:80] / 2 + 1e-6)


def test_asymmetric_uint4_blocks_use_zero_points():
    w = RNG.uniform(0.5, 2.0, size=(64, 8)).astype(np.float32)  # all positive: asymmetric wins
    q, scale, zp = weight_qparams(w, QuantSpec("uint4", "block", False, block_size=32), axis=0)
    assert q.dtype == np.uint8 and q.max() <= 15 and scale.shape == (2, 8)
    error = np.abs((q.astype(np.float32) - np.repeat(zp, 32, 0)) * np.repeat(scale, 32, 0) - w)
    assert error.max() <= np.repeat(scale, 32, 0).max() / 2 + 1e-6


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_large_block_weights_quantize_in_slices_to_the_same_values(monkeypatch, axis, dtype):


    w = np.random.default_rng(0).standard_normal((1000, 300)).astype(np.float32)
    spec = QuantSpec(dtype=dtype, granularity="block", block_size=32, symmetric=True)
    whole = quant_math.block_qparams(w, spec, axis)
    monkeypatch.setattr(quant_math, "CHUNK_BYTES", 10_000)  # ~8 rows or columns a slice
    sliced = quant_math.block_qparams(w, spec, axis)
    for a, b in zip(whole, sliced):
        assert a.dtype == b.dtype and np.array_equal(a, b)
