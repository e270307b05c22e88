"""Materialization: turn annotations and calibrated ranges into QuantizeLinear / DequantizeLinear nodes.

Weights become integer initializers feeding DequantizeLinear (the float copy is dropped when nothing else
reads it); activations get a QuantizeLinear -> DequantizeLinear pair shared by every quantized consumer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtc.core.quant_math import activation_qparams, storage_array, weight_qparams
from qtc.core.weights import original_name
from qtc.errors import QtcError
from qtc.passes.annotate import QuantAnnotation, activation_key, annotated_nodes
from qtc.passes.meta import RANGES
from qtc.util.spill import release, spill

QDQ_OPSET = 21


def constant_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=spill(ir.tensor(array, name=name)))
    graph.register_initializer(value)
    return value


def _dequantize(graph: ir.Graph, name: str, inputs: list[ir.Value], axis: int | None, block_size: int | None = None) -> ir.Node:
    attributes = {"axis": axis} if axis is not None else {}
    if block_size is not None:
        attributes["block_size"] = block_size
    return ir.node("DequantizeLinear", inputs, attributes, name=f"{name}_DequantizeLinear",
                   outputs=[ir.Value(name=f"{name}_dequantized")])


def _free_base(graph: ir.Graph, preferred: str, fallback: str) -> str:
    """Readable names (`l1.weight_quantized`) unless another tensor already uses them."""
    taken = graph.initializers
    if all(f"{preferred}_{suffix}" not in taken for suffix in ("quantized", "scale", "zero_point")):
        return preferred
    return fallback


def _unsigned(values: np.ndarray) -> np.ndarray:
    """int8 -> uint8 by adding 128 (to values and zero point alike: the same real numbers, exactly)."""
    return (values.astype(np.int16) + 128).astype(np.uint8)


class InsertQDQPass(ir.passes.InPlacePass):
    """Requires annotations (and ranges for static activations); ensures no annotated node reads a float weight.

    `unsigned_activations` / `unsigned_weights` store int8 activations (and the int8 weights that meet them) as
    uint8 with the zero point shifted by 128: numerically identical, and the layout an EP's kernels fuse (ORT's
    x86 CPU EP fuses QDQ MatMuls only for uint8 activations, and its AVX2 U8S8 kernel saturates: U8U8 is exact).
    """

    def __init__(self, unsigned_activations: bool = False, unsigned_weights: bool = False) -> None:
        super().__init__()
        self.unsigned_activations = unsigned_activations
        self.unsigned_weights = unsigned_weights

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 1) < QDQ_OPSET:
            raise ir.passes.PreconditionError(f"QDQ needs default opset >= {QDQ_OPSET}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        ranges = model.meta.get(RANGES, {})
        weight_dq: dict[tuple, ir.Value] = {}
        activation_dq: dict[tuple, ir.Value] = {}
        quantized_weights = set()
        # one weight read by several nodes (a tied table: the lookup and the head) is quantized once, with the
        # integers a rounding algorithm chose for any of its readers (GPTQ runs on the head, which has an input)
        chosen = {(note.weight.name, note.weight_spec, note.axis): note
                  for _, note in annotated_nodes(graph) if note.precomputed is not None}
        for node, note in annotated_nodes(graph):
            key = (note.weight.name, note.weight_spec, note.axis)
            if key not in weight_dq:
                weight_dq[key] = self._quantize_weight(graph, node, note, chosen.get(key))
                quantized_weights.add(note.weight.name)
            self._rewire_weight(node, note, weight_dq[key])
            if note.activation_spec is not None:
                value = node.inputs[note.activation_input]
                act_key = activation_key(value, note.activation_spec)
                if act_key not in ranges:
                    raise QtcError(f"no calibrated range for activation {value.name!r}")
                dq_key = (act_key, note.activation_spec)
                if dq_key not in activation_dq:
                    activation_dq[dq_key] = self._quantize_activation(graph, node, value, ranges[act_key], note)
                node.replace_input_with(note.activation_input, activation_dq[dq_key])
        for name in sorted(quantized_weights):
            value = graph.initializers[name]
            if not value.uses():
                graph.initializers.pop(name)  # no float copy kept
        return ir.passes.PassResult(model, modified=bool(weight_dq))

    def _quantize_weight(self, graph: ir.Graph, node: ir.Node, note: QuantAnnotation,
                         rounded: QuantAnnotation | None) -> ir.Value:
        """`rounded`: the reader whose integers a rounding algorithm chose (None: round to nearest here)."""
        tensor = note.weight.const_value
        if rounded is not None:
            q, scale, zero_point = rounded.chosen_weights()
        else:
            q, scale, zero_point = weight_qparams(tensor.numpy(), note.weight_spec, note.axis)
        release(tensor)  # drop the float mapping now: peak memory stays near one tensor, not the model
        base = _free_base(graph, original_name(note.weight), note.weight.name)
        dtype = note.weight_spec.dtype
        if self.unsigned_weights and dtype == "int8" and note.activation_spec is not None:
            q, zero_point = _unsigned(q), _unsigned(zero_point)
            dtype = "uint8"
        inputs = [constant_initializer(graph, f"{base}_quantized", storage_array(q, dtype)),
                  constant_initializer(graph, f"{base}_scale", scale)]
        if zero_point.any():  # an all-zero zero point is the default: leaving it out saves a byte per 2 blocks
            inputs.append(constant_initializer(graph, f"{base}_zero_point", storage_array(zero_point, dtype)))
        dq = _dequantize(graph, base, inputs, note.axis, note.weight_spec.block_size)
        graph.insert_before(note.transpose or node, dq)
        return dq.outputs[0]

    @staticmethod
    def _rewire_weight(node: ir.Node, note: QuantAnnotation, dequantized: ir.Value) -> None:
        if note.transpose is None:
            node.replace_input_with(note.weight_input, dequantized)
        elif note.transpose.inputs[0] is note.weight:
            note.transpose.replace_input_with(0, dequantized)

    def _quantize_activation(self, graph, node, value, value_range, note) -> ir.Value:
        scale, zero_point = activation_qparams(*value_range, note.activation_spec)
        if self.unsigned_activations and zero_point.dtype == np.int8:
            zero_point = _unsigned(zero_point)
        base = value.name
        scale_value = constant_initializer(graph, f"{base}_scale", scale)
        zero_value = constant_initializer(graph, f"{base}_zero_point", zero_point)
        quantize = ir.node("QuantizeLinear", [value, scale_value, zero_value], name=f"{base}_QuantizeLinear",
                           outputs=[ir.Value(name=f"{base}_quantized")])
        dq = _dequantize(graph, base, [quantize.outputs[0], scale_value, zero_value], None)
        graph.insert_before(node, [quantize, dq])
        return dq.outputs[0]

    def ensures(self, model: ir.Model) -> None:
        for node, note in annotated_nodes(model.graph):
            reader = note.transpose or node
            source = reader.inputs[0 if note.transpose else note.weight_input]
            if source.producer() is None or source.producer().op_type != "DequantizeLinear":
                raise ir.passes.PostconditionError(f"node {node.name!r} still reads a float weight")
