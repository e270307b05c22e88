"""Block-int4 weight MatMuls written as MatMulNBits with the recipe's accuracy level in the node."""

import numpy as np
import onnx_ir as ir

from qtc.backends.base import ACCURACY_LEVEL
from qtc.passes import meta
from qtc.passes.matmulnbits import WriteMatMulNBitsPass
from qtc.passes.pipeline import build_pipeline
from qtc.recipes import builtin_recipe
from tests import graphs

PROVENANCE = {"qtc.recipe": "test"}


def _qdq_form(hidden: int, inner: int) -> ir.Model:
    """w4a16 on cuda keeps the portable DequantizeLinear -> MatMul form: the input of the rewrite."""
    model = graphs.mlp(hidden=hidden, inner=inner)
    build_pipeline(builtin_recipe("w4a16"), "cuda", None, provenance=PROVENANCE, quiet=True)(model)
    return model


def _levels(model: ir.Model) -> list[int]:
    return [n.attributes.get_int("accuracy_level") for n in model.graph if n.op_type == "MatMulNBits"]


def test_written_kernels_compute_what_ort_fuses_itself_at_level_zero():
    portable = _qdq_form(64, 96)  # 96 = 3 blocks of 32; 64 = 2 blocks
    feed = graphs.random_feed(portable)
    expected = graphs.run(portable, feed, {ACCURACY_LEVEL: "0"})[0]
    written = graphs.copy_of(portable)
    WriteMatMulNBitsPass(0)(written)
    assert "DequantizeLinear" not in graphs.ops(written) and _levels(written) == [0, 0]
    assert written.meta[meta.WRITTEN_MATMULNBITS] == {"nodes": 2, "accuracy_level": 0}
    np.testing.assert_allclose(graphs.run(written, feed)[0], expected, rtol=1e-5, atol=1e-5)


def test_a_partial_last_block_is_padded():
    """K = 48 is one and a half blocks of 32 (zh-tiny-lm's down_proj: K = 688)."""
    portable = _qdq_form(16, 48)
    feed = graphs.random_feed(portable)
    written = graphs.copy_of(portable)
    WriteMatMulNBitsPass(0)(written)
    assert len(_levels(written)) == 2
    np.testing.assert_allclose(graphs.run(written, feed)[0], graphs.run(portable, feed, {ACCURACY_LEVEL: "0"})[0],
                               rtol=1e-5, atol=1e-5)


def test_level_four_quantizes_activations_and_says_so_in_the_node():
    portable = _qdq_form(64, 96)
    feed = graphs.random_feed(portable)
    written = graphs.copy_of(portable)
    WriteMatMulNBitsPass(4)(written)
    assert _levels(written) == [4, 4]
    got, float_acts = graphs.run(written, feed)[0], graphs.run(portable, feed, {ACCURACY_LEVEL: "0"})[0]
    assert 0 < np.abs(got - float_acts).max() < 0.05 * np.abs(float_acts).max()


def test_the_cpu_pipeline_writes_them_with_the_level_it_is_given():
    model = graphs.mlp(hidden=64, inner=96)
    build_pipeline(builtin_recipe("w4a16"), "cpu", None, provenance=PROVENANCE, quiet=True, accuracy_level=0)(model)
    assert _levels(model) == [0, 0] and "DequantizeLinear" not in graphs.ops(model)
    assert meta.quantized_counts(model)["quantized_nodes_by_op"] == {"MatMulNBits": 2}


def test_asymmetric_weights_keep_the_portable_form():
    portable = _qdq_form(64, 96)
    dq = next(n for n in portable.graph if n.op_type == "DequantizeLinear")
    zp = ir.Value(name="zp4", const_value=ir.Tensor(np.zeros(dq.inputs[1].const_value.shape.numpy(), dtype=np.int8),
                                                    dtype=ir.DataType.INT4))
    portable.graph.register_initializer(zp)
    dq.resize_inputs(3)
    dq.replace_input_with(2, zp)
    WriteMatMulNBitsPass(0)(portable)
    assert len(_levels(portable)) == 1  # the other weight, without a zero point


def test_int8_blocks_pack_too():
    """An 8-bit block weight (an LM head kept at 8 bits) becomes MatMulNBits bits=8, at accuracy_level 4 whatever
    the recipe's level (EIGHT_BIT_NOTE): the portable form's numbers but for int8 activations per block."""
    from qtc.recipes import QuantSpec, Recipe

    base = builtin_recipe("w4a16")
    recipe = Recipe(**{**base.__dict__, "name": "w8-blocks", "weight": QuantSpec("int8", "block", True, block_size=32)})
    portable = graphs.mlp(hidden=64, inner=96)
    build_pipeline(recipe, "cuda", None, provenance=PROVENANCE, quiet=True)(portable)
    feed = graphs.random_feed(portable)
    written = graphs.copy_of(portable)
    WriteMatMulNBitsPass(0)(written)
    nodes = [n for n in written.graph if n.op_type == "MatMulNBits"]
    assert [(n.attributes.get_int("bits"), n.attributes.get_int("accuracy_level")) for n in nodes] == [(8, 4), (8, 4)]
    assert written.meta[meta.WRITTEN_MATMULNBITS]["eight_bit_nodes_at_level_4"] == 2
    got, expected = graphs.run(written, feed)[0], graphs.run(portable, feed, {ACCURACY_LEVEL: "0"})[0]
    assert 0 < np.abs(got - expected).max() <= 3e-2 * np.abs(expected).max()
