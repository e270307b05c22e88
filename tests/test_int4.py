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
