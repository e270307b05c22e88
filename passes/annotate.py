"""Policy: decide, per node, what the recipe quantizes. Nothing in the graph changes here.

The decision is stored as a `QuantAnnotation` in `node.meta[ANNOTATION]`; calibration and QDQ insertion read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qtc.core.weights import find_weight, initializer_with_data, match_names
from qtc.passes.meta import ANNOTATED, ANNOTATION, ROLE, TIED
from qtc.recipes import QuantSpec, Recipe
from qtc.util.spill import release

# Ops a logits tensor may pass through on its way from the LM head's MatMul to a graph output.
_LOGIT_PASSTHROUGH = {"Reshape", "Identity", "Cast", "Add", "Mul", "Div", "Tanh", "Squeeze", "Unsqueeze"}


@dataclass
class QuantAnnotation:
    """What to quantize on one node: the weight (an initializer, maybe behind a Transpose) and the activation."""

    weight: ir.Value  # the float initializer
    weight_input: int  # which input of the node reads it (directly or through `transpose`)
    axis: int | None  # DequantizeLinear axis *of the initializer*: channels, or blocks; None per tensor
    transpose: ir.Node | None  # a Transpose between initializer and node (kept; DQ goes before it)
    weight_spec: QuantSpec
    activation_input: int | None
    activation_spec: QuantSpec | None
    reduce_axis: int = 0  # the initializer's axis the node sums over
    precomputed: tuple | None = None  # (q, scale, zero_point) tensors chosen by a rounding algorithm (GPTQ, AWQ)

    def chosen_weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`precomputed` as arrays, copied out of the scratch file and unmapped: a mapping left open keeps its
        pages resident to the end of the compile (a 7B GPTQ compile's packing passes held 9 GB, RTN's 3.7)."""
        arrays = []
        for tensor in self.precomputed:
            arrays.append(np.array(tensor.numpy()))
            release(tensor)
        return tuple(arrays)


def _activation_input(node: ir.Node) -> int | None:
    value = node.inputs[0]
    return 0 if value is not None and value.const_value is None and not value.is_initializer() else None


def mark_roles(graph: ir.Graph) -> None:
    """Tag embedding Gathers and the LM head (the weighted MatMul/Gemm that feeds a graph output)."""
    embedding_tables = set()
    for node in graph:
        if node.op_type == "Gather" and initializer_with_data(node.inputs[0]) is not None:
            node.meta[ROLE] = "embedding"
            embedding_tables.add(node.inputs[0].name)
    for node in graph:
        found = find_weight(node) if node.op_type in ("MatMul", "Gemm") else None
        if found is not None and found.value.name in embedding_tables:
            node.meta[ROLE] = "lm_head"  # tied to the embedding table
            node.meta[TIED] = True
    for output in graph.outputs:
        node = output.producer()
        while node is not None and node.op_type in _LOGIT_PASSTHROUGH:
            feeders = [v for v in node.inputs if v is not None and v.producer() is not None]
            node = feeders[0].producer() if feeders else None
        if node is not None and node.op_type in ("MatMul", "Gemm") and find_weight(node) is not None:
            node.meta[ROLE] = "lm_head"


class AnnotateQuantizationPass(ir.passes.InPlacePass):
    """Attach a QuantAnnotation to every top-level node the recipe quantizes (subgraphs are left alone)."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        mark_roles(graph)
        count = 0
        for node in graph:
            found = find_weight(node)
            if found is None or node.meta.get(ROLE) == "rotation":  # an online rotation stays float
                continue
            names = match_names(node, found.value)
            decision = self.recipe.resolve(node.name or "", node.op_type, names, node.meta.get(ROLE),
                                           tied=node.meta.get(TIED, False))
            if decision is None:
                continue
            act_input = _activation_input(node) if decision.activation is not None else None
            axes = {"channel": found.out_axis, "block": found.reduce_axis, "tensor": None}
            node.meta[ANNOTATION] = QuantAnnotation(
                weight=found.value,
                weight_input=found.input_index,
                axis=axes[decision.weight.granularity],
                transpose=found.transpose,
                weight_spec=decision.weight,
                activation_input=act_input,
                activation_spec=decision.activation if act_input is not None else None,
                reduce_axis=found.reduce_axis,
            )
            count += 1
        model.meta[ANNOTATED] = count
        return ir.passes.PassResult(model, modified=False)


def annotated_nodes(graph: ir.Graph) -> list[tuple[ir.Node, QuantAnnotation]]:
    return [(node, node.meta[ANNOTATION]) for node in graph if ANNOTATION in node.meta]


def layer_groups(graph: ir.Graph) -> dict[str, list[tuple[ir.Node, QuantAnnotation]]]:
    """Annotated nodes grouped by the activation they read (q/k/v projections share one input)."""
    groups: dict[str, list] = {}
    for node, note in annotated_nodes(graph):
        x = node.inputs[0]
        if x is not None and x.const_value is None:
            groups.setdefault(x.name, []).append((node, note))
    return groups


def activation_key(value: ir.Value, spec: QuantSpec) -> tuple:
    """Identifies one observed activation: the same tensor under two calibrator settings needs two ranges."""
    return (value.name, spec.calibrator, spec.percentile if spec.calibrator == "percentile" else None)


def activations_to_observe(graph: ir.Graph) -> dict[tuple, tuple[ir.Value, QuantSpec]]:
    wanted = {}
    for node, note in annotated_nodes(graph):
        if note.activation_spec is not None:
            value = node.inputs[note.activation_input]
            wanted.setdefault(activation_key(value, note.activation_spec), (value, note.activation_spec))
    return dict(sorted(wanted.items(), key=lambda item: str(item[0])))
