"""Weight-only int8 layers in the form ORT's CPU EP runs at float speed.

ORT fuses every weight-only DequantizeLinear -> MatMul into com.microsoft::MatMulNBits. For 8-bit weights its CPU
kernel has no float-activation path in ORT 1.32: it dequantizes the whole weight on every call, so a w8a16
layer runs 2.8x slower than float for a 256-token prefill and 20x slower for a one-token decode step
(bench/weight_kernels.py, Gemma-3-270m's 640 x 2048 down projection, 2-core AVX2 machine). Level 4 would be fast
but quantizes the activations to int8, which is not what "a16" promises.

So on that target the DequantizeLinear of a weight-only int8 weight becomes Cast -> (Sub zero point) -> Mul scale:
the same numbers (DequantizeLinear computes (q - zero_point) * scale in float32), which ORT's constant folding
turns into one float32 weight at session load. The file keeps the int8 weights (a quarter of the float bytes);
the running process holds float32 weights and computes exactly what the recipe says, at float speed.

Block-quantized weights (int4 MatMulNBits, which has a float kernel, and the embedding tables of passes/embedding_tables.py)
and weights that meet quantized activations (integer kernels) keep their DequantizeLinear.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtc.passes.meta import EXPANDED
from qtc.passes.qdq import constant_initializer

GEMMS = ("MatMul", "Gemm")


def _reads_float_activations(gemm: ir.Node) -> bool:
    """The GEMM's other operand is not dequantized: a weight-only layer, not an integer-kernel one."""
    a = gemm.inputs[0]
    return a is not None and (a.producer() is None or a.producer().op_type != "DequantizeLinear")


def _only_weight_only_gemms(value: ir.Value) -> bool:
    """Every reader is a GEMM taking `value` as its weight (B), directly or through one Transpose."""
    for user, index in value.uses():
        if user.op_type == "Transpose":
            if not user.outputs[0].uses() or not _only_weight_only_gemms(user.outputs[0]):
                return False
        elif user.op_type not in GEMMS or index != 1 or not _reads_float_activations(user):
            return False
    return bool(value.uses())


def why_not(node: ir.Node) -> str | None:
    """None when this DequantizeLinear is a weight-only int8 weight to expand; otherwise the reason it is kept."""
    weight = node.inputs[0]
    if weight is None or weight.const_value is None:
        return "input is not a constant weight"
    if weight.const_value.dtype not in (ir.DataType.INT8, ir.DataType.UINT8):
        return f"weight is {weight.const_value.dtype}, not 8-bit"
    if weight.const_value.shape.rank() != 2:
        return "weight is not a matrix"
    if node.attributes.get_int("block_size", 0):
        return "block-quantized (MatMulNBits reads the blocks)"
    if any(v is not None and v.const_value is None for v in node.inputs[1:]):
        return "scale or zero point is not a constant"
    if not _only_weight_only_gemms(node.outputs[0]):
        return "read by something other than a weight-only GEMM"
    return None


def _broadcast_scale(scale: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """Per-axis scales [C] shaped to broadcast along `axis` of a rank-`rank` weight (a scalar stays a scalar)."""
    if scale.ndim == 0:
        return scale
    shape = [1] * rank
    shape[axis % rank] = scale.size
    return scale.reshape(shape)


class ExpandInt8WeightsPass(ir.passes.InPlacePass):
    """Requires InsertQDQPass's weights; ensures no weight-only GEMM reads an 8-bit DequantizeLinear (see module)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        expanded = 0
        for node in list(graph):
            if node.op_type == "DequantizeLinear" and node.domain == "" and why_not(node) is None:
                self._expand(graph, node)
                expanded += 1
        model.meta[EXPANDED] = expanded
        return ir.passes.PassResult(model, modified=bool(expanded))

    @staticmethod
    def _expand(graph: ir.Graph, node: ir.Node) -> None:
        weight, scale, *zero = node.inputs
        rank = weight.const_value.shape.rank()
        axis = node.attributes.get_int("axis", 1)
        base = node.name.removesuffix("_DequantizeLinear")
        values = ir.node("Cast", [weight], {"to": ir.DataType.FLOAT}, name=f"{base}_Cast", outputs=[ir.Value(name=f"{base}_float")])
        nodes = [values]
        if zero and zero[0] is not None:
            zero_point = _broadcast_scale(zero[0].const_value.numpy().astype(np.float32), axis, rank)
            offset = constant_initializer(graph, f"{base}_zero_point_float", zero_point)
            nodes.append(ir.node("Sub", [nodes[-1].outputs[0], offset], name=f"{base}_Sub", outputs=[ir.Value(name=f"{base}_centred")]))
        scale_value = constant_initializer(graph, f"{base}_scale_broadcast", _broadcast_scale(scale.const_value.numpy(), axis, rank))
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], scale_value], name=f"{base}_Mul", outputs=[ir.Value(name=f"{base}_expanded")]))
        graph.insert_before(node, nodes)
        node.outputs[0].replace_all_uses_with(nodes[-1].outputs[0])
        graph.remove(node, safe=True)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type == "DequantizeLinear" and node.domain == "" and why_not(node) is None:
                raise ir.passes.PostconditionError(f"{node.name!r} still dequantizes a weight-only int8 weight")
