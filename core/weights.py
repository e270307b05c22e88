"""Where a node's constant weight is (the initializer, the input reading it, its axes) and the names it answers
to: its own, the one it had before constant folding, and the torch module path the exporter recorded."""

from __future__ import annotations

import ast
from dataclasses import dataclass

import onnx_ir as ir


def initializer_with_data(value: ir.Value | None) -> ir.Value | None:
    """The value if it is an initializer holding data, else None."""
    if value is not None and value.is_initializer() and value.const_value is not None:
        return value
    return None


@dataclass(frozen=True)
class WeightRef:
    """Where a node's constant weight is: the initializer, the input that reads it, and its axes."""

    value: ir.Value
    input_index: int
    out_axis: int  # output channels, in the initializer's own layout
    reduce_axis: int  # the axis the node sums over (blocks run along it)
    transpose: ir.Node | None  # a Transpose between initializer and node


def find_weight(node: ir.Node) -> WeightRef | None:
    if node.op_type == "Gather":
        # An embedding table [vocab, hidden]: rows are looked up; "reduce" names hidden, the axis its blocks run
        # along, which is also the reduction axis of a head tied to it (MatMul with the table transposed).
        table = initializer_with_data(node.inputs[0])
        if table is None or table.const_value.shape.rank() != 2 or node.attributes.get_int("axis", 0) != 0:
            return None
        return WeightRef(table, 0, 0, 1, None)
    if node.op_type == "Conv":
        weight = initializer_with_data(node.inputs[1] if len(node.inputs) > 1 else None)
        return WeightRef(weight, 1, 0, 1, None) if weight is not None else None
    if node.op_type == "Gemm":
        weight = initializer_with_data(node.inputs[1])
        trans_b = node.attributes.get_int("transB", 0)
        return WeightRef(weight, 1, 0 if trans_b else 1, 1 if trans_b else 0, None) if weight is not None else None
    if node.op_type == "MatMul":
        b = node.inputs[1]
        if (weight := initializer_with_data(b)) is not None:
            rank = weight.const_value.shape.rank()
            return WeightRef(weight, 1, rank - 1, rank - 2, None) if rank >= 2 else None
        producer = b.producer() if b is not None else None
        if producer is not None and producer.op_type == "Transpose" and (weight := initializer_with_data(producer.inputs[0])):
            rank = weight.const_value.shape.rank()
            perm = producer.attributes.get_ints("perm", list(range(rank))[::-1])
            return WeightRef(weight, 1, perm[rank - 1], perm[rank - 2], producer) if rank >= 2 else None
    return None


def original_name(value: ir.Value) -> str:
    """The name a weight had before constant folding renamed it (onnxscript records it), else its own."""
    folded = value.metadata_props.get("pkg.onnxscript.optimizer.folded_from", "")
    names = ast.literal_eval(folded) if folded.startswith("[") else []
    return names[0] if len(names) == 1 else value.name or ""


def module_path(node: ir.Node) -> str:
    """`model.layers.0.mlp.down_proj` from the torch exporter's name scopes, or ""."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    parts = ast.literal_eval(scopes) if scopes.startswith("[") else []
    # Each scope is a full module path ('', 'model', 'model.layers.0', ...); the last one is the aten op itself.
    return parts[-2] if len(parts) >= 2 else ""


def match_names(node: ir.Node, weight: ir.Value) -> tuple[str, ...]:
    return tuple(sorted({n for n in (weight.name or "", original_name(weight), module_path(node)) if n}))
