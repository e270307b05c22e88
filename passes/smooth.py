"""Outlier migration by per-input-channel scaling: X' = X / s, W' = diag(s) W, so X' W' = X W exactly in float.

SmoothQuant picks s to flatten activation outliers (s_j = max|X_j|^a / max|W_j|^(1-a)); AWQ picks s = rms(X_j)^a
to protect the weights that meet large activations. Both are scored without stored activations: with
H = E[x x^T], a weight error D costs tr(D^T H D) per token, and per-tensor activation rounding with step d costs
about d^2 / 12 * ||W||_F^2.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from qtc.core.quant_math import dequantize_weight, weight_qparams
from qtc.passes.annotate import QuantAnnotation, layer_groups
from qtc.passes.meta import LAYER_STATS, SMOOTHING
from qtc.recipes import QuantSpec, SmoothSpec
from qtc.util.spill import spill

ALPHA_GRID = tuple(np.round(np.arange(0.0, 1.0001, 0.1), 2))
MIN_SCALE = 1e-5

Member = tuple[ir.Node, QuantAnnotation]


def node_layout(note: QuantAnnotation, array: np.ndarray) -> np.ndarray:
    """A 2-D weight as [K (reduced), N (outputs)], whatever the initializer's own layout."""
    return array.T if note.reduce_axis == 1 else array


def initializer_layout(note: QuantAnnotation, array: np.ndarray) -> np.ndarray:
    return array.T if note.reduce_axis == 1 else array


def weight_matrix(note: QuantAnnotation, dtype=np.float64) -> np.ndarray:
    return node_layout(note, note.weight.const_value.numpy().astype(dtype, copy=False))


ERROR_COLUMNS = 512


def error_slabs(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec,
                row_divisor: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """D = dequantized(q) / row_divisor - w in node layout [K, N] (scale and zero point in node layout too), a
    slab of ERROR_COLUMNS output columns at a time: temporaries of K x 512, not whole-weight float64 copies (four
    of those were 2 GB beside a 7B down projection's 1.4 GB H)."""
    axis = {"block": 0, "channel": 1, "tensor": None}[spec.granularity]
    for start in range(0, w.shape[1], ERROR_COLUMNS):
        cols = slice(start, min(start + ERROR_COLUMNS, w.shape[1]))
        d = dequantize_weight(q[:, cols], _columns(scale, axis, cols), _columns(zero_point, axis, cols), axis,
                              spec.block_size)
        if row_divisor is not None:
            d /= row_divisor.astype(np.float32)[:, None]
        # float32, as DequantizeLinear computes it (float64 slabs took a third of AWQ's scale search)
        d -= w[:, cols]
        yield d


def weighted_error(h: np.ndarray, w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                   spec: QuantSpec, row_divisor: np.ndarray | None = None) -> float:
    """tr(D^T H D) for D of `error_slabs`, in H's float32."""
    total = 0.0
    for d in error_slabs(w, q, scale, zero_point, spec, row_divisor):
        d = d.astype(h.dtype, copy=False)
        total += float(np.sum((h @ d) * d, dtype=np.float64))
    return total


def _columns(values: np.ndarray, axis: int | None, cols: slice) -> np.ndarray:
    """A scale's (or zero point's) part for output columns `cols`: per block [K/b, N], per channel [N]."""
    if axis is None:
        return values
    return values[:, cols] if axis == 0 else values[cols]


def rounding_error(note: QuantAnnotation, w: np.ndarray, h: np.ndarray, scale: np.ndarray | None = None) -> float:
    """tr(D^T H D) for the RTN error D of weight w ([K, N]); with `scale`, w is first scaled by rows and the
    error measured back in the original space (AWQ)."""
    scaled = w * scale[:, None] if scale is not None else w
    q, qs, zp = weight_qparams(initializer_layout(note, scaled), note.weight_spec, note.axis)
    if note.weight_spec.granularity == "block":
        qs, zp = node_layout(note, qs), node_layout(note, zp)
    return weighted_error(h, w, node_layout(note, q), qs, zp, note.weight_spec, scale)


def _scalable(graph: ir.Graph, members: list[Member]) -> bool:
    """Only 2-D weights read by nothing but this group can be rescaled in place."""
    readers = {id(node) for node, _ in members} | {id(note.transpose) for _, note in members if note.transpose}
    for _, note in members:
        if note.weight.const_value.shape.rank() != 2:
            return False
        if any(id(user) not in readers for user, _ in note.weight.uses()):
            return False
    return True


# Fused norms (passes/fusion.py runs first): output 0 is normalized * gamma (+ beta); (gamma, beta) input indices.
NORM_AFFINE_INPUTS = {
    "SimplifiedLayerNormalization": (1, None),
    "SkipSimplifiedLayerNormalization": (2, None),
    "LayerNormalization": (1, 2),
    "SkipLayerNormalization": (2, 3),
}


def _fold_into_producer(x: ir.Value, members: list[Member], inverse: np.ndarray) -> bool:
    """X = Mul(a, gamma) with a constant per-channel gamma (an RMSNorm/LayerNorm weight), or a fused norm's gamma
    (and beta): scale those instead of inserting a Mul."""
    producer = x.producer()
    if producer is None or {id(u) for u, _ in x.uses()} != {id(n) for n, _ in members}:
        return False
    if producer.op_type == "Mul":
        return any(_scale_vector(gamma, inverse) for gamma in producer.inputs if _per_channel(gamma, inverse))
    if producer.op_type in NORM_AFFINE_INPUTS and x.index() == 0:
        gamma, beta = (producer.inputs[i] if i is not None and i < len(producer.inputs) else None
                       for i in NORM_AFFINE_INPUTS[producer.op_type])
        if _per_channel(gamma, inverse) and (beta is None or _per_channel(beta, inverse)):
            _scale_vector(gamma, inverse)
            if beta is not None:
                _scale_vector(beta, inverse)
            return True
    return False


def _per_channel(value: ir.Value | None, inverse: np.ndarray) -> bool:
    tensor = value.const_value if value is not None else None
    return tensor is not None and tensor.shape.rank() == 1 and tensor.shape[0] == len(inverse) and len(value.uses()) == 1


def _scale_vector(value: ir.Value, inverse: np.ndarray) -> bool:
    array = value.const_value.numpy()
    value.const_value = spill(ir.tensor((array * inverse).astype(array.dtype), name=value.name))
    return True


def apply_channel_scale(graph: ir.Graph, x: ir.Value, members: list[Member], s: np.ndarray) -> str:
    """Rescale in place; returns how X was divided ("folded" into its producer, or an inserted "Mul")."""
    for _, note in members:
        w = weight_matrix(note) * s[:, None]
        dtype = note.weight.const_value.numpy().dtype
        note.weight.const_value = spill(ir.tensor(initializer_layout(note, w).astype(dtype), name=note.weight.name))
    inverse = (1.0 / s).astype(np.float32)
    if _fold_into_producer(x, members, inverse):
        return "folded"
    scale = ir.Value(name=f"{x.name}_channel_scale", const_value=ir.tensor(inverse, name=f"{x.name}_channel_scale"))
    graph.register_initializer(scale)
    mul = ir.node("Mul", [x, scale], name=f"{x.name}_ChannelScale", outputs=[ir.Value(name=f"{x.name}_scaled")])
    graph.insert_before(members[0][0], mul)
    for node, _ in members:
        node.replace_input_with(0, mul.outputs[0])
    return "Mul"


def unscaled(value: ir.Value) -> ir.Value:
    """The activation a channel-scale Mul (apply_channel_scale) divides, or the value itself."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Mul" and producer.name == f"{producer.inputs[0].name}_ChannelScale":
        return producer.inputs[0]
    return value


def update_statistics(stats: dict, s: np.ndarray) -> None:
    """The statistics of X' = X / s follow from those of X: no second calibration run needed for them."""
    if "range" in stats:
        stats["range"].rescale(s)
    if "absmax" in stats:
        stats["absmax"].value = stats["absmax"].value / s
    if "gram" in stats:
        stats["gram"].rescale(s)


def smooth_scale(absmax: np.ndarray, members: list[Member], alpha: float) -> np.ndarray:
    wmax = np.max([np.abs(weight_matrix(note)).max(axis=1) for _, note in members], axis=0)
    s = np.power(np.maximum(absmax, MIN_SCALE), alpha) / np.power(np.maximum(wmax, MIN_SCALE), 1 - alpha)
    return np.clip(s, MIN_SCALE, None)


def predicted_error(members: list[Member], stats: dict, s: np.ndarray) -> float:
    """Weight rounding error plus per-tensor activation rounding noise, per token, for scale s."""
    h = (stats["gram"].mean / np.outer(s, s)).astype(np.float32)
    total = 0.0
    step = 2 * float(np.max(stats["absmax"].value / s)) / 255
    for _, note in members:
        w = weight_matrix(note) * s[:, None]
        total += rounding_error(note, w, h) + step**2 / 12 * float(np.sum(w * w))
    return total


class SmoothActivationsPass(ir.passes.InPlacePass):
    """SmoothQuant on every activation shared by quantized layers (before range calibration)."""

    def __init__(self, spec: SmoothSpec) -> None:
        super().__init__()
        self.spec = spec

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, all_stats = model.graph, model.meta.get(LAYER_STATS, {})
        record = {}
        for name, members in sorted(layer_groups(graph).items()):
            stats = all_stats.get(name)
            if stats is None or "absmax" not in stats or not _scalable(graph, members):
                continue
            if all(note.activation_spec is None for _, note in members):
                continue  # weight-only readers (e.g. a w8a16 override): no activation rounding to relieve
            alpha = self._alpha(members, stats)
            s = smooth_scale(stats["absmax"].value, members, alpha)
            how = apply_channel_scale(graph, members[0][0].inputs[0], members, s)
            update_statistics(stats, s)
            record[name] = {"alpha": alpha, "applied": how, "max_scale": float(s.max()), "min_scale": float(s.min())}
        model.meta[SMOOTHING] = record
        return ir.passes.PassResult(model, modified=bool(record))

    def _alpha(self, members: list[Member], stats: dict) -> float:
        if self.spec.alpha != "auto":
            return float(self.spec.alpha)
        errors = {a: predicted_error(members, stats, smooth_scale(stats["absmax"].value, members, a)) for a in ALPHA_GRID}
        return float(min(errors, key=errors.get))
