"""float8 E4M3 recipe: the grid (scale amax / 448, saturation, round to nearest even) and an end-to-end compile of
zh-tiny-lm that ORT CPU runs as QuantizeLinear / DequantizeLinear around float MatMuls."""

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

import qtc
from qtc.core.quant_math import activation_qparams, dequantize_weight, weight_qparams
from qtc.errors import QtcError
from qtc.models.reference import build_reference
from qtc.recipes import QuantSpec, builtin_recipe, parse_recipe

FP8 = QuantSpec("float8e4m3fn", "channel", True)


def test_fp8_weight_grid():
    w = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    w[3, 5] = 40.0  # one outlier: it sets its column's scale and must land exactly on +448
    q, scale, zero_point = weight_qparams(w, FP8, axis=1)
    assert q.dtype == ml_dtypes.float8_e4m3fn and not zero_point.astype(np.float32).any()
    np.testing.assert_allclose(scale, np.abs(w).max(0) / 448, rtol=1e-6)
    assert float(q[3, 5]) == 448.0 and not np.isnan(q.astype(np.float32)).any()
    restored = dequantize_weight(q, scale, zero_point, 1, None)
    normal = np.abs(w) >= 2.0**-6 * scale  # E4M3 normals: 3 mantissa bits, half a step <= 1/16 relative
    assert np.all(np.abs(restored - w)[normal] <= np.abs(w)[normal] / 16 + 1e-7)


def test_fp8_activation_scale_saturates_instead_of_overflowing():
    spec = QuantSpec("float8e4m3fn", "tensor", True, calibrator="minmax")
    scale, zero_point = activation_qparams(-3.0, 7.0, spec)
    assert float(scale) == pytest.approx(7.0 / 448) and zero_point.dtype == ml_dtypes.float8_e4m3fn
    big = np.array([100.0], dtype=np.float32) / scale
    assert float(np.clip(big, -448, 448).astype(ml_dtypes.float8_e4m3fn)[0]) == 448.0


@pytest.mark.parametrize("spec", [{"symmetric": False}, {"granularity": "block", "block_size": 32}, {"algorithm": "gptq"}])
def test_fp8_rejects_what_the_grid_cannot_be(spec):
    with pytest.raises(QtcError, match="float8e4m3fn is symmetric"):
        parse_recipe({"base": "fp8", "weight": spec})


def test_fp8_compiles_and_runs_on_ort_cpu(tmp_path):
    model = build_reference("zh-tiny-lm")
    result = qtc.compile(model, recipe="fp8", calib="zh-news", samples=4, seq_len=64, quiet=True)
    path = result.save(tmp_path / "fp8.onnx")
    fp8 = [v.const_value for v in ir.load(path).graph.initializers.values()
           if v.const_value.dtype == ir.DataType.FLOAT8E4M3FN and v.const_value.size > 1]
    assert len(fp8) == 28 and sum(t.nbytes for t in fp8) == 2_899_968  # the 28 projections, one byte a weight
    runtime = result.report["runtime_ops"]
    assert runtime["ops"]["QuantizeLinear"] > 0 and runtime["ops"]["DequantizeLinear"] >= 28
    assert "float32 arithmetic" in result.report["target_notes"][0]  # what really runs is said, not implied
    logits = result.report["heldout_comparison"]["outputs"]["logits"]
    assert logits["cosine"] > 0.999 and logits["top1_agreement"] > 0.95
    assert builtin_recipe("fp8").activation.dtype == "float8e4m3fn"
