"""InsertQDQPass on hand-built graphs: integer weights behind DequantizeLinear, Q/DQ pairs on activations, and the
result computing on ORT CPU what the same quantization computes in numpy."""

import numpy as np
import onnx_ir as ir
import pytest

from qtc.backends.base import ACCURACY_LEVEL
from qtc.core.quant_math import activation_qparams, weight_qparams
from qtc.errors import QtcError
from qtc.passes.annotate import AnnotateQuantizationPass, activations_to_observe
from qtc.passes.meta import RANGES
from qtc.passes.qdq import InsertQDQPass
from qtc.recipes import builtin_recipe
from tests import graphs


def _annotate(model: ir.Model, recipe: str = "w8a8") -> ir.Model:
    AnnotateQuantizationPass(builtin_recipe(recipe))(model)
    return model


def _mlp_activations(model: ir.Model, feed: dict) -> dict[str, np.ndarray]:
    """The float activations the two MatMuls of `graphs.mlp` read, computed in numpy."""
    seen = {}
    graphs.mlp_numpy(feed["x"], graphs.initializer(model, "w_up"), graphs.initializer(model, "w_down"),
                     lambda name, value: seen.setdefault(name, value))
    return seen


def _set_ranges(model: ir.Model, activations: dict[str, np.ndarray]) -> dict:
    """What calibration with the minmax calibrator would write into model.meta: the exact min and max."""
    ranges = {key: (float(activations[value.name].min()), float(activations[value.name].max()))
              for key, (value, _) in activations_to_observe(model.graph).items()}
    model.meta[RANGES] = ranges
    return ranges


def _quantized_mlp(seed=0, **flags):
    model = graphs.mlp(seed=seed)
    feed = graphs.random_feed(model, seed=seed + 1)
    expected = graphs.run(model, feed)[0]
    _annotate(model)
    ranges = _set_ranges(model, _mlp_activations(model, feed))
    weights = {name: graphs.initializer(model, name) for name in ("w_up", "w_down")}
    result = InsertQDQPass(**flags)(model)
    assert result.modified
    return model, feed, expected, ranges, weights


def test_weights_become_int8_behind_dequantize_linear():
    model, _, _, _, weights = _quantized_mlp()
    spec = builtin_recipe("w8a8").weight
    inits = model.graph.initializers
    assert "w_up" not in inits and "w_down" not in inits  # no float copy kept
    for name, node_name in (("w_up", "up"), ("w_down", "down")):
        q, scale, _ = weight_qparams(weights[name], spec, axis=1)  # per output channel of [K, N]
        stored = inits[f"{name}_quantized"].const_value
        assert stored.dtype == ir.DataType.INT8 and np.array_equal(stored.numpy(), q)
        assert np.array_equal(inits[f"{name}_scale"].const_value.numpy(), scale)
        assert f"{name}_zero_point" not in inits  # symmetric: an all-zero zero point is left out
        matmul = next(n for n in model.graph if n.name == node_name)
        dq = matmul.inputs[1].producer()
        assert dq.op_type == "DequantizeLinear" and dq.attributes.get_int("axis") == 1
        assert dq.inputs[0] is inits[f"{name}_quantized"]
        # symmetric int8 on [-127, 127]: every weight within half a step of its float value
        dequantized = q.astype(np.float32) * scale
        assert np.all(np.abs(dequantized - weights[name]) <= scale / 2 + 1e-7)


def test_activations_get_a_quantize_dequantize_pair():
    model, _, _, ranges, _ = _quantized_mlp()
    for node_name, activation in (("up", "x"), ("down", "h")):
        matmul = next(n for n in model.graph if n.name == node_name)
        dq = matmul.inputs[0].producer()
        assert dq.op_type == "DequantizeLinear"
        quantize = dq.inputs[0].producer()
        assert quantize.op_type == "QuantizeLinear" and quantize.inputs[0].name == activation
        assert quantize.inputs[1] is dq.inputs[1] and quantize.inputs[2] is dq.inputs[2]  # one scale, one zero point
        zero_point = quantize.inputs[2].const_value
        assert zero_point.dtype == ir.DataType.INT8  # asymmetric int8 activations, signed storage by default
        key = next(k for k in ranges if k[0] == activation)
        scale, expected_zero = activation_qparams(*ranges[key], builtin_recipe("w8a8").activation)
        assert quantize.inputs[1].const_value.numpy() == scale and zero_point.numpy() == expected_zero
    assert graphs.ops(model).count("QuantizeLinear") == 2 and graphs.ops(model).count("DequantizeLinear") == 4


def test_quantized_graph_runs_and_computes_the_numpy_quantization():
    model, feed, expected, ranges, weights = _quantized_mlp()
    got = graphs.run(model, feed)[0]
    # close to float, but not float: the quantization really happens
    error = np.abs(got - expected).max()
    assert 0 < error < 0.03 * np.abs(expected).max()
    # and exactly what quantize -> dequantize of activations and weights computes in numpy
    recipe = builtin_recipe("w8a8")
    key = {name: next(k for k in ranges if k[0] == name) for name in ("x", "h")}
    emulated = graphs.mlp_numpy(feed["x"], *(graphs.dequantized_weight(weights[n], recipe.weight, 1) for n in ("w_up", "w_down")),
                                lambda name, value: graphs.fake_quant(value, ranges[key[name]], recipe.activation))
    assert np.abs(got - emulated).max() < 1e-5


def test_unsigned_storage_is_the_same_numbers():
    signed, feed, _, _, _ = _quantized_mlp()
    unsigned, *_ = _quantized_mlp(unsigned_activations=True, unsigned_weights=True)
    inits = unsigned.graph.initializers
    assert inits["w_up_quantized"].const_value.dtype == ir.DataType.UINT8
    assert inits["x_zero_point"].const_value.dtype == ir.DataType.UINT8
    # the weights' symmetric zero point 0 becomes 128, so it is now written out
    assert np.all(inits["w_up_zero_point"].const_value.numpy() == 128)
    assert np.array_equal(inits["w_up_quantized"].const_value.numpy().astype(np.int16) - 128,
                          signed.graph.initializers["w_up_quantized"].const_value.numpy())
    assert np.array_equal(graphs.run(unsigned, feed)[0], graphs.run(signed, feed)[0])


def test_one_activation_read_by_two_layers_gets_one_pair():
    model = graphs.shared_input()
    feed = graphs.random_feed(model)
    expected = graphs.run(model, feed)[0]
    _annotate(model)
    _set_ranges(model, {"x": feed["x"]})
    InsertQDQPass()(model)
    ops = graphs.ops(model)
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 3  # x once, w_q and w_k
    q, k = (n for n in model.graph if n.op_type == "MatMul")
    assert q.inputs[0] is k.inputs[0] and q.inputs[1] is not k.inputs[1]
    got = graphs.run(model, feed)[0]
    assert np.abs(got - expected).max() < 0.03 * np.abs(expected).max()


def test_weight_only_recipe_leaves_activations_float():
    model = graphs.mlp()
    feed = graphs.random_feed(model)
    expected = graphs.run(model, feed)[0]
    _annotate(model, "w8a16")
    InsertQDQPass()(model)  # no ranges needed
    ops = graphs.ops(model)
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == 2
    assert next(n for n in model.graph if n.name == "up").inputs[0].name == "x"
    got = graphs.run(model, feed)[0]
    assert 0 < np.abs(got - expected).max() < 0.01 * np.abs(expected).max()


def test_int4_blocks_are_packed_with_block_size():
    model = graphs.mlp(hidden=64, inner=64)
    feed = graphs.random_feed(model)
    expected = graphs.run(model, feed)[0]
    spec = builtin_recipe("w4a16").weight
    w_up, w_down = (graphs.dequantized_weight(graphs.initializer(model, n), spec, 0) for n in ("w_up", "w_down"))
    _annotate(model, "w4a16")
    InsertQDQPass()(model)
    dq = next(n for n in model.graph if n.name == "up").inputs[1].producer()
    assert dq.attributes.get_int("block_size") == 32 and dq.attributes.get_int("axis") == 0  # along K of [K, N]
    assert dq.inputs[0].const_value.dtype == ir.DataType.INT4
    assert tuple(dq.inputs[1].const_value.shape) == (2, 64)  # one scale per block of 32 and column
    # ORT fuses block DequantizeLinear -> MatMul into MatMulNBits; accuracy level 0 keeps its activations float
    got = graphs.run(model, feed, {ACCURACY_LEVEL: "0"})[0]
    assert np.abs(got - expected).max() > 0.01  # int4 is coarse ...
    # ... and exactly the float model with its weights replaced by the dequantized blocks
    assert np.abs(got - graphs.mlp_numpy(feed["x"], w_up, w_down)).max() < 1e-5


def test_missing_range_is_an_error_naming_the_activation():
    model = _annotate(graphs.mlp())
    with pytest.raises(QtcError, match="no calibrated range for activation 'x'"):
        InsertQDQPass()(model)


def test_below_the_qdq_opset_is_refused():
    model = _annotate(graphs.mlp(opset=20), "w8a16")
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 21"):
        InsertQDQPass()(model)
