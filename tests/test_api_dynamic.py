"""w8a8-dynamic: int8 block weights, activations quantized at run time by the kernel, no calibration needed."""

import onnx_ir as ir
import pytest

import qtc
from qtc.errors import QtcError
from qtc.recipes import builtin_recipe, parse_recipe


def test_w8a8_dynamic_writes_8bit_matmulnbits_at_level_4(tiny_llama, chinese_corpus, tmp_path):
    assert not builtin_recipe("w8a8-dynamic").needs_calibration
    result = qtc.compile(tiny_llama, recipe="w8a8-dynamic", calib=chinese_corpus, samples=2, seq_len=64, quiet=True)
    model = ir.load(result.save(tmp_path / "dyn.onnx"))
    kernels = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(kernels) == 28
    assert {(n.attributes.get_int("bits"), n.attributes.get_int("accuracy_level")) for n in kernels} == {(8, 4)}
    assert not [n for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]  # nothing static
    assert any("at run time" in note for note in result.report["target_notes"])
    logits = result.report["heldout_comparison"]["outputs"]["logits"]
    assert logits["cosine"] > 0.999 and logits["top1_agreement"] > 0.95  # tiny_llama: random weights


def test_dynamic_activations_take_no_calibrator_and_need_block_weights(tiny_llama):
    with pytest.raises(QtcError, match="no calibrator"):
        parse_recipe({"name": "x", "weight": {"dtype": "int8", "granularity": "block", "block_size": 32},
                      "activation": {"dtype": "int8", "dynamic": True, "calibrator": "minmax"}})
    per_channel = parse_recipe({"base": "w8a8-dynamic", "name": "y", "weight": {"granularity": "channel", "block_size": None}})
    with pytest.raises(QtcError, match="takes block weights"):
        qtc.compile(tiny_llama, recipe=per_channel, quiet=True, compare=False)
