"""Quantized embedding tables: the Gather and a tied LM head read one packed table, on ORT CPU's block kernels,
and compute exactly what the float model computes with the dequantized table."""

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass

import qtc
from qtc.core.quant_math import dequantize_weight, weight_qparams
from qtc.errors import QtcError
from qtc.measure.inspection import inspect_model
from qtc.models.reference import TOKENIZER_FILE, build_reference
from qtc.passes import meta
from qtc.passes.annotate import AnnotateQuantizationPass
from qtc.passes.embedding_tables import FuseQuantizedTablesPass, check_table, pack_blocks
from qtc.passes.meta import FUSED_TABLES, quantized_counts
from qtc.passes.qdq import InsertQDQPass
from qtc.recipes import builtin_recipe, parse_recipe
from tests import graphs

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
    # an 8-bit head runs with int8 activations per block (accuracy_level 4: EIGHT_BIT_NOTE), a 4-bit one in float
    assert np.abs(got - expected).max() <= (1e-4 if bits == 4 else 3e-2) * np.abs(expected).max()


@pytest.mark.parametrize("dtype", ["int4", "uint4"])
def test_asymmetric_table_is_fused_with_its_zero_points_and_the_same_numbers(tied_lm, tmp_path, dtype):
    """A zero point per block (what a 4-bit LM head needs, see embedding_tables): both kernels get them in their
    own layouts, and compute what the float model computes with the dequantized table."""
    recipe = _table_only(symmetric=False, dtype=dtype)
    result = qtc.compile(tied_lm, recipe=recipe, quiet=True)
    path = result.save(tmp_path / "asym.onnx")
    ops = result.report["runtime_ops"]["ops"]
    assert ops.get("com.microsoft::GatherBlockQuantized") == 1 and ops.get("com.microsoft::MatMulNBits") == 1
    assert "DequantizeLinear" not in ops
    graph = ir.load(path).graph
    gather = next(n for n in graph if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph if n.op_type == "MatMulNBits")
    assert gather.inputs[3].const_value.shape.numpy() == (4096, 256 // 32, 1)  # like its [vocab, blocks, 1] scales
    assert head.inputs[3].const_value.shape.numpy() == (4096, 256 // 32 // 2)  # two 4-bit zero points a byte
    reference = _dequantized_reference(tied_lm, recipe.embedding, tmp_path / "reference.onnx")
    ids = _ids(4096)
    got, expected = _logits(path, ids), _logits(reference, ids)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_a_tied_table_rounded_by_gptq_on_the_heads_statistics(tied_lm, chinese_corpus, tmp_path):
    """`algorithm: gptq` on a tied table: GPTQ runs on the head (the reader with an input to take statistics from)
    and the lookup reads the same integers: one packed table, a lower in-sample error than round-to-nearest, and
    logits closer to float."""
    cosines = {}
    for algorithm in ("rtn", "gptq"):
        recipe = _table_only(symmetric=False, algorithm=algorithm)
        result = qtc.compile(tied_lm, recipe=recipe, calib=chinese_corpus, tokenizer=TOKENIZER_FILE, samples=8, seq_len=64,
                             quiet=True)
        ops = result.report["runtime_ops"]["ops"]
        assert ops.get("com.microsoft::GatherBlockQuantized") == 1 and ops.get("com.microsoft::MatMulNBits") == 1
        cosines[algorithm] = result.report["heldout_comparison"]["outputs"]["logits"]["cosine"]
        layers = result.report["rounding"]["layers"] if result.report.get("rounding") else {}
        if algorithm == "gptq":
            (record,) = layers.values()  # the head: its input has statistics, the lookup's does not
            assert record["used"] == "gptq" and record["error_algorithm"] < 0.5 * record["error_rtn"]
        else:
            assert not layers
    assert 1 - cosines["gptq"] < 0.5 * (1 - cosines["rtn"])


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
        ({"embedding": TABLE | {"algorithm": "awq"}}, r"rounded to nearest \(rtn\) or by GPTQ"),
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


# --------------------------------------------------------------------- hand-built graphs (no export needed)


def _table_recipe(**table):
    return parse_recipe({"base": "w4a16", "name": "table-only", "op_types": [], "embedding": TABLE | table})


def _portable_tied_lm(**table) -> tuple[ir.Model, object]:
    """graphs.tiny_lm with a tied head, its table quantized by InsertQDQPass in the portable DequantizeLinear form."""
    recipe = _table_recipe(**table)
    model = graphs.tiny_lm(tied=True)
    AnnotateQuantizationPass(recipe)(model)
    InsertQDQPass()(model)
    return model, recipe


def test_pack_blocks_int8_adds_128_and_groups_blocks():
    q = np.arange(-128, 128, dtype=np.int8).reshape(4, 64)
    packed = pack_blocks(q, bits=8, block_size=16)
    assert packed.dtype == np.uint8 and packed.shape == (4, 4, 16)
    assert np.array_equal(packed.reshape(4, 64).astype(np.int16) - 128, q)


def test_pack_blocks_int4_puts_the_first_value_in_the_low_nibble():
    q = np.array([[-8, 7, -1, 0, 1, 2, 3, 4]], dtype=np.int8)
    packed = pack_blocks(q, bits=4, block_size=4)
    assert packed.shape == (1, 2, 2)
    # offsets +8: [0, 15, 7, 8, 9, 10, 11, 12] -> bytes 0xF0, 0x87, 0xA9, 0xCB
    assert packed.reshape(-1).tolist() == [0xF0, 0x87, 0xA9, 0xCB]
    low, high = packed.reshape(-1) & 0xF, packed.reshape(-1) >> 4
    assert np.array_equal(np.stack([low, high], axis=-1).reshape(1, 8).astype(np.int16) - 8, q)


def _dequantize(table: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, **attributes):
    """A DequantizeLinear node on constant inputs, and its (output, table, scale) for check_table."""
    values = [graphs.weight("t", table), graphs.weight("s", scale)]
    if zero_point is not None:
        values.append(graphs.weight("z", zero_point))
    node = ir.node("DequantizeLinear", values, attributes, outputs=[ir.Value(name="dq")])
    return node.outputs[0], values[0], values[1]


@pytest.mark.parametrize("change, reason", [
    ({}, None),
    ({"zero_point": np.zeros((8, 2), np.int8)}, None),
    ({"table": np.zeros((8, 64), np.uint8), "zero_point": np.zeros((8, 2), np.uint8)}, None),
    ({"block_size": 8}, "power-of-two size >= 16"),
    ({"block_size": 24}, "power-of-two size >= 16"),
    ({"axis": 0}, "along axis 1"),
    ({"table": np.zeros((8, 48), np.int8), "scale": np.ones((8, 2), np.float32)}, "not a whole number of blocks"),
    ({"scale": np.ones((8, 1), np.float32)}, "scales are not float32"),
    ({"table": np.zeros((2, 8, 64), np.int8)}, "not 2-D (u)int4 / (u)int8"),
    ({"table": np.zeros((8, 64), np.int16)}, "not 2-D (u)int4 / (u)int8"),
])
def test_check_table_accepts_power_of_two_blocks_along_hidden(change, reason):
    table = change.get("table", np.zeros((8, 64), np.int8))
    scale = change.get("scale", np.ones((8, 2), np.float32))
    attributes = {"axis": change.get("axis", 1), "block_size": change.get("block_size", 32)}
    result = check_table(*_dequantize(table, scale, change.get("zero_point"), **attributes))
    if reason is None:
        assert result, result.reason
    else:
        assert not result and reason in result.reason


@pytest.mark.parametrize("table", [{}, {"dtype": "int8", "block_size": 16}])
def test_fuse_tables_on_a_hand_built_tied_model(table):
    model, recipe = _portable_tied_lm(**table)
    feed = graphs.random_feed(model)
    # the portable form: one DequantizeLinear of the table, read by the Gather and the head's Transpose
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and sorted(user.op_type for user, _ in dq[0].outputs[0].uses()) == ["Gather", "Transpose"]
    stored = dq[0].inputs[0].const_value.numpy().astype(np.int8)
    scale = dq[0].inputs[1].const_value.numpy()
    portable = graphs.run(model, feed)[0]

    result = FuseQuantizedTablesPass()(model)
    RemoveUnusedNodesPass()(model)
    assert result.modified and model.meta[FUSED_TABLES] == 2
    fused = {n.op_type: n for n in model.graph if n.domain == "com.microsoft"}
    assert set(fused) == {"GatherBlockQuantized", "MatMulNBits"}
    assert "DequantizeLinear" not in graphs.ops(model) and "Transpose" not in graphs.ops(model)
    blob = fused["GatherBlockQuantized"].inputs[0]
    assert fused["MatMulNBits"].inputs[1] is blob  # one packed table, read by both kernels
    bits = 4 if recipe.embedding.dtype == "int4" else 8
    assert np.array_equal(blob.const_value.numpy(), pack_blocks(stored, bits, recipe.embedding.block_size))
    assert quantized_counts(model)["quantized_nodes_by_op"] == {"GatherBlockQuantized": 1, "MatMulNBits": 1}

    assert fused["MatMulNBits"].attributes.get_int("accuracy_level") == (1 if bits == 4 else 4)  # EIGHT_BIT_NOTE
    tolerance = 1e-4 if bits == 4 else 3e-2  # int8 activations per block for the 8-bit head
    got = graphs.run(model, feed)[0]
    assert np.abs(got - portable).max() <= tolerance * np.abs(portable).max()
    # ... which is the float model computed with the dequantized table
    dequantized = dequantize_weight(stored, scale, np.zeros_like(scale, dtype=np.int8), 1, recipe.embedding.block_size)
    hidden = np.maximum(dequantized[feed["ids"]] @ graphs.initializer(model, "w_mlp"), 0)
    assert np.abs(got - hidden @ dequantized.T).max() <= tolerance * np.abs(got).max()


@pytest.mark.parametrize("level", [None, 0, 4])
def test_a_4_bit_tied_head_runs_at_the_recipes_block_level(level):
    """w4a16 (level 0): the head in float (level 1); w4a8 (level 4): int8 activations per block like its layers,
    the ORT GenAI builder's head (twice as fast at decode on gemma-3-270m), and the report says so."""
    model, _ = _portable_tied_lm()
    FuseQuantizedTablesPass(level)(model)
    head = next(n for n in model.graph if n.op_type == "MatMulNBits")
    assert head.attributes.get_int("accuracy_level") == (4 if level == 4 else 1)
    notes = [w for w in model.meta.get(meta.WARNINGS, []) if "tied LM head (4-bit table)" in w]
    assert len(notes) == (1 if level == 4 else 0)


def test_asymmetric_hand_built_table_fuses_and_computes_what_the_portable_form_does():
    model, _ = _portable_tied_lm(symmetric=False)
    feed = graphs.random_feed(model)
    portable = graphs.run(model, feed)[0]
    result = FuseQuantizedTablesPass()(model)
    RemoveUnusedNodesPass()(model)
    assert result.modified and model.meta[FUSED_TABLES] == 2 and "DequantizeLinear" not in graphs.ops(model)
    got = graphs.run(model, feed)[0]
    assert np.abs(got - portable).max() <= 1e-4 * np.abs(portable).max()


@pytest.mark.parametrize("bits, transpose", [(4, False), (8, False), (4, True), (8, True)])
def test_packing_slab_by_slab_writes_what_packing_at_once_does(monkeypatch, bits, transpose):
    import qtc.passes.embedding_tables as tables

    rng = np.random.default_rng(0)
    limit = 7 if bits == 4 else 127
    q = rng.integers(-limit, limit + 1, size=(70, 40), dtype=np.int8)
    monkeypatch.setattr(tables, "PACK_ROWS", 16)  # several slabs, the last one short
    rows = q.T if transpose else q  # K = 40 or 70: a partial last block either way
    whole = pack_blocks(np.pad(rows, ((0, 0), (0, -rows.shape[1] % 32))), bits, 32)
    assert np.array_equal(tables.pack_rows(q, bits, 32, transpose=transpose), whole)
