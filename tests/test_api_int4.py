"""4-bit block recipes end to end: packed MatMulNBits with the recipe's accuracy level, agreement with float."""

import onnx_ir as ir

import qtc


def test_w4a16_writes_packed_matmulnbits_with_float_activations(tiny_llama, tmp_path):
    result = qtc.compile(tiny_llama, recipe="w4a16", calib="zh-news", samples=2, seq_len=64, quiet=True)
    path = result.save(tmp_path / "w4.onnx")
    assert result.report["runtime_ops"]["ops"].get("com.microsoft::MatMulNBits") == 28
    model = ir.load(path)
    kernels = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(kernels) == 28  # written by qtc, not left to ORT's fusion and its session-config accuracy level
    assert {n.attributes.get_int("accuracy_level") for n in kernels} == {0}
    assert {n.attributes.get_int("block_size") for n in kernels} == {32}
    packed = sum(n.inputs[1].const_value.nbytes for n in kernels)
    scales = sum(n.inputs[2].const_value.nbytes for n in kernels)
    weights = sum(n.attributes.get_int("K") * n.attributes.get_int("N") for n in kernels)
    padded = sum(-(-n.attributes.get_int("K") // 32) * 32 * n.attributes.get_int("N") for n in kernels)  # K = 688
    assert packed == padded / 2  # two 4-bit values per byte, really stored packed
    assert (packed + scales) / (4 * weights) <= 0.16  # one fp32 scale per 32 weights, no zero points (symmetric)
    assert not [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert result.report["heldout_comparison"]["outputs"]["logits"]["cosine"] > 0.9


def test_cann_report_says_the_npu_computes_block_int4_in_float(tiny_llama):
    result = qtc.compile(tiny_llama, recipe="w4a16", target="cann", quiet=True, compare=False)
    note = next(n for n in result.report["target_notes"] if n.startswith("w4a16 on cann"))
    assert "host CPU" in note and "computes in float" in note and "not the blocks" in note
    placement = result.report["placement"]["graph"]
    assert placement["cpu_ops"].get("DequantizeLinear", 0) > 0  # the placement model agrees: DQ on the host
