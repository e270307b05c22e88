"""Quantized embedding tables: the Gather and a tied LM head read one packed table, on ORT CPU's block kernels,
and compute exactly what the float model computes with the dequantized table."""

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import qtc
from qtc.core.quant_math import dequantize_weight, weight_qparams
from qtc.errors import QtcError
from qtc.measure.inspection import inspect_model
from qtc.models.reference import build_reference
from qtc.recipes import builtin_recipe, parse_recipe

TABLE = {"dtype": "int4", "granularity": "block", "block_size": 32}


@pytest.fixture(scope="module")
def zh_tiny_lm() -> Path:
    return build_reference("zh-tiny-lm")


@pytest.fixture(scope="module")
def tied_lm(zh_tiny_lm, tmp_path_factory) -> Path:
    """zh-tiny-lm with its head tied to the embedding table, in the graph form the torch dynamo exporter gives
    tied models (Gemma 3): Gather(table, ids) and MatMul(x, Transpose(table)). Its logits are not a trained
    model's (the head was untied in training), which is irrelevant here: these tests compare graphs, not quality."""
    model = ir.load(zh_tiny_lm)
    graph = model.graph
    table = next(node.inputs[0] for node in graph if node.op_type == "Gather" and node.inputs[0].is_initializer())
    head = next(node for node in graph if node.op_type == "MatMul" and node.inputs[1].name == "lm_head.weight")
    transpose = ir.node("Transpose", [table], {"perm": [1, 0]}, name="tied_head_transpose",
                        outputs=[ir.Value(name="tied_head_weight")])
    graph.insert_before(head, transpose)
    head.replace_input_with(1, transpose.outputs[0])
    graph.initializers.pop("lm_head.weight")
    path = tmp_path_factory.mktemp("tied") / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return path


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def _dequantized_reference(source: Path, spec, out: Path) -> Path:
    """The float model with its embedding table replaced by quant -> dequant in numpy (nothing else changed)."""
    model = ir.load(source)
    table = next(node.inputs[0] for node in model.graph if node.op_type == "Gather")
    axis = 1 if spec.granularity == "block" else 0
    q, scale, zero_point = weight_qparams(table.const_value.numpy(), spec, axis)
    table.const_value = ir.tensor(dequantize_weight(q, scale, zero_point, axis, spec.block_size), name=table.name)
    ir.save(model, out, external_data=out.name + ".data")
    return out


def _ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, size=(2, 48)).astype(np.int64)


def _table_only(**table) -> object:
    """Only the table is quantized (op_types empty), so the reference differs from float in the table alone."""
    return parse_recipe({"base": "w4a16", "name": "table-only", "op_types": [], "embedding": TABLE | table})


@pytest.mark.parametrize("table", [{}, {"dtype": "int8", "block_size": 64}])
def test_tied_table_is_stored_once_and_matches_dequantized_float(tied_lm, tmp_path, table):
    recipe = _table_only(**table)
    result = qtc.compile(tied_lm, recipe=recipe, quiet=True)
    path = result.save(tmp_path / "tied.onnx")
    ops = result.report["runtime_ops"]["ops"]
    assert ops.get("com.microsoft::GatherBlockQuantized") == 1 and ops.get("com.microsoft::MatMulNBits") == 1
    assert "DequantizeLinear" not in ops and "Gather" not in ops
    assert result.report["compiled"]["quantized_nodes_by_op"] == {"GatherBlockQuantized": 1, "MatMulNBits": 1}
    big = {v.name: v.const_value for v in ir.load(path).graph.initializers.values() if v.const_value.size >= 4096 * 8}
    bits = 4 if recipe.embedding.dtype == "int4" else 8
    block = recipe.embedding.block_size
    # one uint8 blob [vocab, hidden / block, block * bits / 8] read by both kernels; no int4 or float copy left
    assert [(t.dtype, tuple(t.shape.numpy())) for t in big.values() if t.shape.rank() == 3] == \
        [(ir.DataType.UINT8, (4096, 256 // block, block * bits // 8))]
    assert not [n for n, t in big.items() if t.dtype in (ir.DataType.INT4, ir.DataType.FLOAT) and t.shape.rank() == 2
                and tuple(t.shape.numpy()) in ((4096, 256), (256, 4096))]
    assert inspect_model(path)["weights_quantized"]["quantized_elements"] == 4096 * 256  # counted as weights
    reference = _dequantized_reference(tied_lm, recipe.embedding, tmp_path / "reference.onnx")
    ids = _ids(4096)
    got, expected = _logits(path, ids), _logits(reference, ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_asymmetric_table_keeps_the_portable_form_and_the_same_numbers(tied_lm, tmp_path):
    """The kernels' default zero point only fits symmetric grids: an asymmetric table must not be fused."""
    recipe = _table_only(symmetric=False)
    result = qtc.compile(tied_lm, recipe=recipe, quiet=True)
    path = result.save(tmp_path / "asym.onnx")
    ops = result.report["runtime_ops"]["ops"]
    # (ORT gives each reader its own DequantizeLinear of the one table)
    assert "com.microsoft::GatherBlockQuantized" not in ops and "com.microsoft::MatMulNBits" not in ops
    assert ops.get("DequantizeLinear") == 2
    reference = _dequantized_reference(tied_lm, recipe.embedding, tmp_path / "reference.onnx")
    ids = _ids(4096)
    got, expected = _logits(path, ids), _logits(reference, ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_untied_head_follows_keep_float(zh_tiny_lm, tmp_path):
    recipe = parse_recipe({"base": "w4a16", "name": "w4a16-table", "embedding": TABLE})
    assert "embedding" not in recipe.keep_float and "lm_head" in recipe.keep_float
    result = qtc.compile(zh_tiny_lm, recipe=recipe, quiet=True)
    ops = result.report["runtime_ops"]["ops"]
    assert ops.get("com.microsoft::GatherBlockQuantized") == 1
    assert ops.get("com.microsoft::MatMulNBits") == 28  # the untied head stays a float MatMul
    assert list(result.report["compiled"]["kept_float_roles"].values()) == ["lm_head"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"embedding": TABLE, "keep_float": ["embedding"]}, "keep_float lists embedding"),
        ({"embedding": {"dtype": "int4", "granularity": "tensor"}}, "granularity must be block or channel"),
        ({"embedding": TABLE | {"algorithm": "gptq"}}, "rounded to nearest"),
        ({"embedding": {"bits": 4}}, "unknown key 'bits'"),
    ],
)
def test_invalid_embedding_specs_are_errors(data, message):
    with pytest.raises(QtcError, match=message):
        parse_recipe({"base": "w4a16", **data})


def test_embedding_resolves_for_table_and_tied_head_only():
    recipe = parse_recipe({"base": "w8a8", "name": "t", "embedding": TABLE,
                           "overrides": [{"name": "*", "quantize": False}]})
    for role, tied in (("embedding", False), ("lm_head", True)):
        decision = recipe.resolve("n", "Gather" if role == "embedding" else "MatMul", role=role, tied=tied)
        assert decision.weight == recipe.embedding and decision.activation is None  # rules do not apply
    assert recipe.resolve("head", "MatMul", role="lm_head") is None  # an untied head: keep_float
    assert builtin_recipe("w8a8").embedding is None and builtin_recipe("w4a16").embedding.dtype == "int8"
