"""Per-layer sensitivity: how much noise each quantized layer adds to its own output, from streamed statistics.

For a layer y = x W with H = E[x x^T] (per token):
- signal            S   = tr(W^T H W)                 (E||y||^2)
- weight noise      N_w = tr(D^T H D), D = Q(W) - W   (exact for the chosen rounding)
- activation noise  N_a = step^2 / 12 * ||W||_F^2     (uniform rounding of x with the calibrated per-tensor step)
and SQNR = 10 log10(S / (N_w + N_a)). A low SQNR names the layer; the larger noise term says why (weights or
activations), and the activation's range says what (e.g. one outlier channel stretching a per-tensor scale).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtc.core.quant_math import activation_qparams
from qtc.core.weights import module_path
from qtc.passes.annotate import activation_key, annotated_nodes
from qtc.passes.meta import LAYER_STATS, OBSERVERS, RANGES
from qtc.passes.smooth import rounding_error, weight_matrix


def _db(signal: float, noise: float) -> float:
    return float(10 * np.log10(signal / noise)) if noise > 0 and signal > 0 else float("inf")


def layer_sensitivity(model: ir.Model) -> list[dict]:
    """One row per quantized 2-D layer, most sensitive (lowest SQNR) first."""
    stats, ranges, observers = model.meta.get(LAYER_STATS, {}), model.meta.get(RANGES, {}), model.meta.get(OBSERVERS, {})
    rows = []
    for node, note in annotated_nodes(model.graph):
        x = node.inputs[0]
        gram = stats.get(x.name, {}).get("gram") if x is not None else None
        if gram is None or note.weight.const_value.shape.rank() != 2:
            continue
        h, w = gram.mean, weight_matrix(note)
        signal = float(np.sum((h @ w) * w))
        weight_noise = rounding_error(note, w, h)
        row = {"node": node.name, "module": module_path(node), "op": node.op_type, "weight": note.weight.name,
               "weight_sqnr_db": _db(signal, weight_noise)}
        activation_noise = 0.0
        if note.activation_spec is not None:
            key = activation_key(x, note.activation_spec)
            scale, _ = activation_qparams(*ranges[key], note.activation_spec)
            activation_noise = float(scale) ** 2 / 12 * float(np.sum(w * w))
            summary = observers.get(key, {})
            row |= {"activation": x.name, "activation_range": [summary.get("lo"), summary.get("hi")],
                    "activation_minmax": [summary.get("min"), summary.get("max")],
                    "activation_sqnr_db": _db(signal, activation_noise)}
            absmax = stats.get(x.name, {}).get("absmax")
            if absmax is not None:
                row["channel_absmax_top"] = [float(v) for v in np.sort(absmax.value)[::-1][:3]]
                row["channel_absmax_median"] = float(np.median(absmax.value))
        row["sqnr_db"] = _db(signal, weight_noise + activation_noise)
        row["dominant_noise"] = "activation" if activation_noise > weight_noise else "weight"
        rows.append(row)
    return sorted(rows, key=lambda r: r["sqnr_db"])
