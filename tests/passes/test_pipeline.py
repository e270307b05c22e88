"""build_pipeline on hand-built graphs, end to end through its passes: what each target gets for w8a16 / w8a8, with
calibration streamed from .npz files through ORT CPU, and the result running on ORT CPU."""

import numpy as np
import onnx_ir as ir
import pytest

import qtc
from qtc.backends.base import ACCURACY_LEVEL, max_ir_version
from qtc.calibration.data import load_calibration
from qtc.errors import QtcError
from qtc.passes import meta
from qtc.passes.pipeline import build_pipeline
from qtc.recipes import builtin_recipe
from tests import graphs

PROVENANCE = {"qtc.target": "cpu", "qtc.recipe": "test"}


def _compile(model: ir.Model, recipe: str, target: str = "cpu", calib=None) -> ir.Model:
    build_pipeline(builtin_recipe(recipe), target, calib, provenance=PROVENANCE, quiet=True)(model)
    return model


def _weights(model: ir.Model) -> tuple[np.ndarray, np.ndarray]:
    return graphs.initializer(model, "w_up"), graphs.initializer(model, "w_down")


@pytest.fixture()
def npz_calib(tmp_path):
    """Ten .npz samples for graphs.mlp(): nine calibrate, the last is held out."""
    feeds = [graphs.random_feed(graphs.mlp(), seed=i) for i in range(10)]
    calib = load_calibration(graphs.write_npz(tmp_path / "calib", feeds), tokenizer=None, n_samples=100, seq_len=8, seed=0)
    assert calib.kind == "npz" and calib.n_samples == 9 and len(calib.heldout_samples) == 1
    return calib, feeds


def test_w8a16_on_cpu_stores_int8_and_expands_it_at_load():
    model = graphs.mlp()
    feed = graphs.random_feed(model)
    w_up, w_down = _weights(model)
    _compile(model, "w8a16")
    ops = graphs.ops(model)
    # cpu: weight-only int8 becomes Cast -> Mul (ORT folds it to float32 at load), not DequantizeLinear
    assert "DequantizeLinear" not in ops and "QuantizeLinear" not in ops
    assert ops.count("Cast") == 2 and ops.count("Mul") == 2 and model.meta[meta.EXPANDED] == 2
    stored = {name: value.const_value.dtype for name, value in model.graph.initializers.items()}
    assert stored["w_up_quantized"] == stored["w_down_quantized"] == ir.DataType.INT8
    assert "w_up" not in stored and "w_down" not in stored
    assert meta.quantized_counts(model) == {"quantized_nodes_by_op": {"MatMul": 2}, "kept_float_roles": {}}
    spec = builtin_recipe("w8a16").weight
    expected = graphs.mlp_numpy(feed["x"], graphs.dequantized_weight(w_up, spec, 1), graphs.dequantized_weight(w_down, spec, 1))
    got = graphs.run(model, feed)[0]
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(got - graphs.mlp_numpy(feed["x"], w_up, w_down)).max() > 0  # quantized, not float


def test_w8a16_for_cuda_keeps_dequantize_linear_with_the_same_numbers():
    feed = graphs.random_feed(graphs.mlp())
    cpu, cuda = _compile(graphs.mlp(), "w8a16", "cpu"), _compile(graphs.mlp(), "w8a16", "cuda")
    assert graphs.ops(cuda).count("DequantizeLinear") == 2 and "Cast" not in graphs.ops(cuda)
    assert meta.EXPANDED not in cuda.meta
    # ORT CPU fuses weight-only DequantizeLinear -> MatMul into MatMulNBits: level 0 keeps activations float
    got = graphs.run(cuda, feed, {ACCURACY_LEVEL: "0"})[0]
    assert np.abs(got - graphs.run(cpu, feed)[0]).max() < 1e-5


def test_w8a8_calibrates_on_the_npz_samples_and_runs(npz_calib):
    calib, feeds = npz_calib
    model = graphs.mlp()
    w_up, w_down = _weights(model)
    _compile(model, "w8a8", calib=calib)
    # minmax over the nine calibration samples, not the held-out one
    seen = {"x": [], "h": []}

    def record(name, value):
        seen[name].append(value)
        return value

    for feed in feeds[:9]:
        graphs.mlp_numpy(feed["x"], w_up, w_down, record)
    ranges = model.meta[meta.RANGES]
    assert set(ranges) == {("x", "minmax", None), ("h", "minmax", None)}
    for name in ("x", "h"):
        values = np.stack(seen[name])
        assert ranges[(name, "minmax", None)] == pytest.approx((values.min(), values.max()), rel=1e-6)
    assert ranges[("h", "minmax", None)][0] == 0.0  # after Relu
    assert graphs.ops(model).count("QuantizeLinear") == 2
    zero_points = [n.inputs[2].const_value.dtype for n in model.graph if n.op_type == "QuantizeLinear"]
    assert zero_points == [ir.DataType.UINT8] * 2  # cpu stores activations as uint8
    heldout = feeds[9]
    got = graphs.run(model, heldout)[0]
    float_out = graphs.mlp_numpy(heldout["x"], w_up, w_down)
    assert 0 < np.abs(got - float_out).max() < 0.03 * np.abs(float_out).max()
    recipe = builtin_recipe("w8a8")
    emulated = graphs.mlp_numpy(
        heldout["x"], graphs.dequantized_weight(w_up, recipe.weight, 1), graphs.dequantized_weight(w_down, recipe.weight, 1),
        lambda name, value: graphs.fake_quant(value, ranges[(name, "minmax", None)], recipe.activation))
    assert np.abs(got - emulated).max() < 1e-4 * np.abs(emulated).max()


def test_matmul_with_bias_fuses_into_gemm_before_it_is_quantized(tmp_path):
    model = graphs.mlp(bias=True, shape=("batch",))  # 2-D MatMul + Add: a Gemm for every target
    feeds = [graphs.random_feed(model, seed=i, batch=32) for i in range(10)]
    calib = load_calibration(graphs.write_npz(tmp_path / "calib", feeds), tokenizer=None, n_samples=100, seq_len=8, seed=0)
    expected = graphs.run(model, feeds[-1])[0]
    _compile(model, "w8a8", calib=calib)
    assert meta.report_sections(model)["fusions"]["fusions"]["matmul_bias"]["in_graph"] == 1
    assert meta.quantized_counts(model)["quantized_nodes_by_op"] == {"Gemm": 1, "MatMul": 1}
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert [v.producer().op_type for v in gemm.inputs[:2]] == ["DequantizeLinear", "DequantizeLinear"]
    assert gemm.inputs[2].const_value is not None and gemm.inputs[2].const_value.dtype == ir.DataType.FLOAT  # bias
    got = graphs.run(model, feeds[-1])[0]
    assert np.abs(got - expected).max() < 0.03 * np.abs(expected).max()


def test_embedding_and_lm_head_stay_float():
    model = graphs.tiny_lm()
    _compile(model, "w8a16")
    assert meta.quantized_counts(model) == {"quantized_nodes_by_op": {"MatMul": 1},
                                            "kept_float_roles": {"embed": "embedding", "head": "lm_head"}}
    head = next(n for n in model.graph if n.name == "head")
    assert head.inputs[1].name == "w_head" and head.inputs[1].const_value.dtype == ir.DataType.FLOAT
    assert graphs.run(model, graphs.random_feed(model))[0].shape == (2, 8, 64)


def test_provenance_and_ir_version_are_set_last():
    model = graphs.mlp()
    model.ir_version = max_ir_version() + 1  # what a newer onnx writes; this onnxruntime would refuse it
    _compile(model, "w8a16")
    assert model.ir_version == max_ir_version()
    assert list(model.metadata_props.items()) == sorted(PROVENANCE.items())
    graphs.run(model, graphs.random_feed(model))  # loads


def test_static_recipe_without_calibration_is_refused():
    with pytest.raises(QtcError, match="needs calibration data"):
        qtc.api._run(build_pipeline(builtin_recipe("w8a8"), "cpu", None, quiet=True), graphs.mlp())


def test_same_graph_and_samples_give_the_same_bytes(npz_calib):
    calib, _ = npz_calib
    first, second = (ir.to_proto(_compile(graphs.mlp(), "w8a8", calib=calib)).SerializeToString() for _ in range(2))
    assert first == second
