"""4-bit block recipes end to end: packed storage, ORT's MatMulNBits fusion, agreement with float."""

import onnx_ir as ir

import qtc


def test_w4a16_packs_weights_and_fuses_to_matmulnbits(tiny_llama, tmp_path):
    result = qtc.compile(tiny_llama, recipe="w4a16", calib="zh-news", samples=2, seq_len=64, quiet=True)
    path = result.save(tmp_path / "w4.onnx")
    assert result.report["runtime_ops"]["ops"].get("com.microsoft::MatMulNBits") == 28
    model = ir.load(path)
    int4 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.INT4]
    assert len(int4) == 28
    packed = sum(v.const_value.nbytes for v in int4)
    scales = sum(model.graph.initializers[v.name.replace("_quantized", "_scale")].const_value.nbytes for v in int4)
    fp32 = sum(v.const_value.size * 4 for v in int4)
    assert packed == fp32 / 8  # two 4-bit values per byte, really stored packed
    assert (packed + scales) / fp32 <= 0.16  # with one fp32 scale per 32 weights, no zero points (symmetric)
    assert result.report["heldout_comparison"]["outputs"]["logits"]["cosine"] > 0.9


def test_cann_report_says_the_npu_computes_block_int4_in_float(tiny_llama):
    result = qtc.compile(tiny_llama, recipe="w4a16", target="cann", quiet=True, compare=False)
    note = next(n for n in result.report["target_notes"] if n.startswith("w4a16 on cann"))
    assert "host CPU" in note and "computes in float" in note and "not the blocks" in note
    placement = result.report["placement"]["graph"]
    assert placement["cpu_ops"].get("DequantizeLinear", 0) > 0  # the placement model agrees: DQ on the host
