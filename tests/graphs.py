"""Small hand-built graphs for pass unit tests: a few nodes, fixed-seed weights, opset 21, run on real ORT CPU.

Every builder returns a fresh, shape-inferred `ir.Model` (the passes change models in place). Nodes are named, so
tests can find them; no graph output is a bare MatMul unless a builder says so (a MatMul feeding an output directly
or through Reshape/Add/... is an LM head to the annotator, which the built-in recipes keep float).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import ShapeInferencePass

from qtc.core.quant_math import activation_qparams, dequantize_array, dequantize_weight, quantize_array, weight_qparams

OPSET = 21
FLOAT = ir.DataType.FLOAT


def tensor_input(name: str, shape, dtype: ir.DataType = FLOAT) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))


def weight(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(array, name=name))


def node(op: str, inputs: list, name: str, output: str, **attributes) -> ir.Node:
    return ir.node(op, inputs, attributes, name=name, outputs=[ir.Value(name=output)])


def model_of(inputs: list[ir.Value], outputs: list[ir.Value], nodes: list[ir.Node], initializers: list[ir.Value],
             opset: int = OPSET, ir_version: int = 10) -> ir.Model:
    for value in outputs:
        value.type = value.type or ir.TensorType(FLOAT)
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": opset})
    model = ir.Model(graph, ir_version=ir_version)
    # Types and shapes on every value, as canonicalization leaves them (some rewrite rules check dtypes).
    ShapeInferencePass()(model)
    return model


def mlp(seed: int = 0, hidden: int = 16, inner: int = 32, shape=("batch", 8), bias: bool = False,
        opset: int = OPSET) -> ir.Model:
    """x [*shape, hidden] -> MatMul `up` (w_up) [-> Add b_up] -> Relu -> MatMul `down` (w_down) -> Relu -> y."""
    rng = np.random.default_rng(seed)
    x = tensor_input("x", [*shape, hidden])
    w_up = weight("w_up", rng.normal(0, hidden ** -0.5, (hidden, inner)).astype(np.float32))
    w_down = weight("w_down", rng.normal(0, inner ** -0.5, (inner, hidden)).astype(np.float32))
    initializers = [w_up, w_down]
    nodes = [node("MatMul", [x, w_up], "up", "up_out")]
    if bias:
        b_up = weight("b_up", rng.normal(0, 0.1, inner).astype(np.float32))
        initializers.append(b_up)
        nodes.append(node("Add", [nodes[-1].outputs[0], b_up], "up_bias", "up_biased"))
    nodes.append(node("Relu", [nodes[-1].outputs[0]], "act", "h"))
    nodes.append(node("MatMul", [nodes[-1].outputs[0], w_down], "down", "down_out"))
    nodes.append(node("Relu", [nodes[-1].outputs[0]], "out_act", "y"))
    return model_of([x], [nodes[-1].outputs[0]], nodes, initializers, opset)


def shared_input(seed: int = 0, hidden: int = 16, out: int = 8) -> ir.Model:
    """x read by two MatMuls (`q`, `k`: one activation, two weights) -> Add -> Relu -> y."""
    rng = np.random.default_rng(seed)
    x = tensor_input("x", ["batch", 8, hidden])
    w_q = weight("w_q", rng.normal(0, 0.25, (hidden, out)).astype(np.float32))
    w_k = weight("w_k", rng.normal(0, 0.25, (hidden, out)).astype(np.float32))
    q = node("MatMul", [x, w_q], "q", "q_out")
    k = node("MatMul", [x, w_k], "k", "k_out")
    add = node("Add", [q.outputs[0], k.outputs[0]], "sum", "qk")
    relu = node("Relu", [add.outputs[0]], "act", "y")
    return model_of([x], relu.outputs, [q, k, add, relu], [w_q, w_k])


def two_layers(weight_a: np.ndarray, weight_b: np.ndarray) -> ir.Model:
    """Two independent layers: a -> MatMul `layer_a` -> Relu -> ya and b -> MatMul `layer_b` -> Relu -> yb."""
    hidden = weight_a.shape[0]
    a, b = tensor_input("a", [1, 8, hidden]), tensor_input("b", [1, 8, hidden])
    w_a, w_b = weight("w_a", weight_a.astype(np.float32)), weight("w_b", weight_b.astype(np.float32))
    nodes = [node("MatMul", [a, w_a], "layer_a", "a_out"), node("MatMul", [b, w_b], "layer_b", "b_out")]
    nodes += [node("Relu", [nodes[0].outputs[0]], "act_a", "ya"), node("Relu", [nodes[1].outputs[0]], "act_b", "yb")]
    return model_of([a, b], [nodes[2].outputs[0], nodes[3].outputs[0]], nodes, [w_a, w_b])


def tiny_lm(seed: int = 0, vocab: int = 64, hidden: int = 64, tied: bool = False) -> ir.Model:
    """ids -> Gather(table) -> MatMul `mlp` -> Relu -> MatMul `head` -> logits, the head reading its own weight or,
    tied, Transpose(table) (the form the torch exporter gives tied models)."""
    rng = np.random.default_rng(seed)
    ids = tensor_input("ids", ["batch", "seq"], ir.DataType.INT64)
    table = weight("table", rng.normal(0, 1, (vocab, hidden)).astype(np.float32))
    w_mlp = weight("w_mlp", rng.normal(0, hidden ** -0.5, (hidden, hidden)).astype(np.float32))
    initializers = [table, w_mlp]
    nodes = [node("Gather", [table, ids], "embed", "embedded", axis=0)]
    nodes.append(node("MatMul", [nodes[-1].outputs[0], w_mlp], "mlp", "mlp_out"))
    nodes.append(node("Relu", [nodes[-1].outputs[0]], "act", "h"))
    if tied:
        nodes.append(node("Transpose", [table], "tied_transpose", "table_t", perm=[1, 0]))
        head_weight = nodes[-1].outputs[0]
    else:
        head_weight = weight("w_head", rng.normal(0, hidden ** -0.5, (hidden, vocab)).astype(np.float32))
        initializers.append(head_weight)
    nodes.append(node("MatMul", [nodes[2].outputs[0], head_weight], "head", "logits"))
    return model_of([ids], [nodes[-1].outputs[0]], nodes, initializers)


def random_feed(model: ir.Model, seed: int = 0, batch: int = 2, seq: int = 8, vocab: int = 64,
                scale: float = 1.0) -> dict[str, np.ndarray]:
    """A feed for every graph input: symbolic dims become `batch` (first) or `seq`; floats N(0, scale)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for value in model.graph.inputs:
        dims = [d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(value.shape)]
        if value.dtype == ir.DataType.INT64:
            feed[value.name] = rng.integers(0, vocab, dims).astype(np.int64)
        else:
            feed[value.name] = rng.normal(0, scale, dims).astype(np.float32)
    return feed


def session(model: ir.Model, config: dict[str, str] | None = None) -> ort.InferenceSession:
    """An ORT CPU session on the serialized model; `config`: session config entries (e.g. MatMulNBits accuracy)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: ir.Model, feed: dict[str, np.ndarray], config: dict[str, str] | None = None) -> list[np.ndarray]:
    return session(model, config).run(None, feed)


def copy_of(model: ir.Model) -> ir.Model:
    """An independent copy (node.meta / model.meta are not copied: they never reach the proto)."""
    return ir.from_proto(ir.to_proto(model))


def initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def write_npz(folder: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """One .npz per sample, named so they sort in order (qtc holds the last 10 % out)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"sample_{i:03d}.npz", **feed)
    return folder


# ------------------------------------------------------------------------------- numpy references


def mlp_numpy(x: np.ndarray, w_up: np.ndarray, w_down: np.ndarray, activation=lambda name, value: value) -> np.ndarray:
    """What `mlp` computes (no bias), with `activation(name, value)` applied to what each MatMul reads (x, h)."""
    h = np.maximum(activation("x", x) @ w_up, 0)
    return np.maximum(activation("h", h) @ w_down, 0)


def fake_quant(x: np.ndarray, value_range: tuple[float, float], spec) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear of an activation, per tensor, with qtc's own parameters for the range."""
    scale, zero_point = activation_qparams(*value_range, spec)
    return dequantize_array(quantize_array(x, scale, zero_point, None, spec.dtype), scale, zero_point, None)


def dequantized_weight(w: np.ndarray, spec, axis: int) -> np.ndarray:
    """The weight as qtc's round to nearest leaves it (quantized and dequantized in numpy)."""
    return dequantize_weight(*weight_qparams(w, spec, axis), axis, spec.block_size)
