"""Data-driven weight rounding: GPTQ (error feedback through H^-1) and AWQ (activation-aware scales + clip search).

Both run on the streamed second moment H = E[x x^T] of each layer's input (`CollectLayerStatisticsPass`), never on
stored activations. The chosen integers are handed to `InsertQDQPass` as `note.precomputed`; layers whose
weights are not 2-D, or that have no statistics, fall back to round-to-nearest (recorded in the report).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtc.core.linalg import inverse_cholesky_upper
from qtc.core.quant_math import INT_RANGES, dequantize_weight, expand_scale, weight_qparams
from qtc.passes.annotate import QuantAnnotation, annotated_nodes, layer_groups
from qtc.passes.meta import LAYER_STATS, ROUNDING
from qtc.passes.smooth import (
    Member,
    _scalable,
    apply_channel_scale,
    error_slabs,
    initializer_layout,
    rounding_error,
    update_statistics,
    weight_matrix,
    weighted_error,
)
from qtc.recipes import QuantSpec
from qtc.util.spill import release, spill

GPTQ_BLOCK = 128
# Rows whose errors are pushed one at a time (the rest of a block gets each sub-block's errors in one product):
# row by row over a whole block, the pushes were memory traffic, a third of a 640-wide layer's GPTQ time. The same
# sums in another order: on random data 0.06 % of a 2,048-wide layer's integers moved by a level, its error by 2e-6.
GPTQ_INNER = 32
AWQ_ALPHAS = tuple(np.round(np.arange(0.0, 1.0001, 0.05), 2))
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def node_axis(spec: QuantSpec) -> int | None:
    """The DequantizeLinear axis in node layout [K, N]: blocks run along K (0), channels are N (1)."""
    return {"block": 0, "channel": 1, "tensor": None}[spec.granularity]


def _damped(h: np.ndarray, order: np.ndarray, dead: np.ndarray, damping: float, dtype, reverse: bool,
            consume: bool = False) -> np.ndarray:
    """H in `order` (reversed for the in-place factorization), dead inputs given a unit diagonal, damped by
    `damping` times the mean diagonal: a private copy, or with `consume` H itself where no permutation is asked
    (a 7B down projection's H is 1.4 GB; its copy beside it was the compile's peak)."""
    rows = order[::-1] if reverse else order
    if consume and h.dtype == dtype and h.flags.writeable and np.array_equal(order, np.arange(len(h))):
        m = _reversed_in_place(h) if reverse else h
    else:
        m = np.asarray(h[np.ix_(rows, rows)], dtype=dtype)
    flags = dead[rows]
    m[flags, flags] = 1.0
    m[np.diag_indices_from(m)] += damping * np.mean(np.diag(m))
    return m


def _reversed_in_place(a: np.ndarray) -> np.ndarray:
    """J A J (rows and columns in reverse order) in A's own buffer, a pair of rows at a time."""
    n = len(a)
    for i in range(n // 2):
        top = a[i, ::-1].copy()
        a[i] = a[n - 1 - i, ::-1]
        a[n - 1 - i] = top
    if n % 2:
        a[n // 2] = a[n // 2, ::-1].copy()
    return a


def inverse_cholesky(h: np.ndarray, order: np.ndarray, dead: np.ndarray, damping: float,
                     consume: bool = False) -> np.ndarray:
    """GPTQ's upper factor U of H^-1 (H^-1 = U^T U), H permuted by `order`: blocked and in place in float32
    (core/linalg.py; an 8,960-wide H needs 0.4 GB beside its copy, where numpy.linalg's float64 inv + cholesky
    needed 2.5 GB); float64 LAPACK from a fresh copy only where float32 loses positive definiteness. With
    `consume`, H's own buffer may be factored (it is then garbage) and a failure raises LinAlgError."""
    try:
        return inverse_cholesky_upper(_damped(h, order, dead, damping, np.float32, reverse=True, consume=consume))
    except np.linalg.LinAlgError:
        if consume:
            raise
        m = _damped(h, order, dead, damping, np.float64, reverse=False)
        return np.linalg.cholesky(np.linalg.inv(m)).T.astype(np.float32)


FEEDBACK_ROWS = 4096


def gptq(w: np.ndarray, h: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ in node layout (rows = input channels K); see gptq_with_error."""
    return gptq_with_error(w, h, spec)[:3]


def _gptq_order(h: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(diagonal of H in float64, dead inputs, the order GPTQ quantizes rows in)."""
    diagonal = np.diag(h).astype(np.float64)
    dead = diagonal == 0
    order = np.argsort(-diagonal, kind="stable") if spec.act_order else np.arange(len(h))
    return diagonal, dead, order


def gptq_factor(h: np.ndarray, spec: QuantSpec, consume: bool = False) -> np.ndarray:
    """The upper factor gptq_with_error works with: it depends on H and on the spec's damping and act-order only,
    so the layers reading one activation (q/k/v, gate/up) can share it."""
    _, dead, order = _gptq_order(h, spec)
    return inverse_cholesky(h, order, dead, spec.damping, consume)


def gptq_with_error(w: np.ndarray, h: np.ndarray, spec: QuantSpec, consume: bool = False,
                    upper: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """GPTQ in node layout (rows = input channels K): quantize a row, push its error onto the rows not yet
    quantized through the upper Cholesky factor of H^-1. Scales are fixed up front (static groups), so act-order
    keeps the contiguous blocks DequantizeLinear needs. Also returns the output error tr(D^T H D) without H:
    the feedback errors' squares sum to tr(D^T (H + lambda I) D) over the live rows (GPTQ's loss is exact for
    its quadratic), so it is that sum less lambda ||D||^2. `consume`: H's buffer may be factored in place;
    `upper`: gptq_factor(h, spec), where the caller has it."""
    w = w.astype(np.float32, copy=False)
    scale, zero_point = weight_qparams(w, spec, node_axis(spec))[1:]
    s, z = _row_params(scale, spec), _row_params(zero_point.astype(np.float32), spec)
    qmin, qmax = INT_RANGES[spec.dtype]
    diagonal, dead, order = _gptq_order(h, spec)
    damping = spec.damping * float(np.mean(np.where(dead, 1.0, diagonal)))
    if upper is None:
        upper = inverse_cholesky(h, order, dead, spec.damping, consume)
    work = w[order]
    work[dead[order]] = 0.0
    q = np.zeros_like(work)
    feedback = 0.0
    for start in range(0, len(work), GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, len(work))
        errors = np.zeros((end - start, work.shape[1]), dtype=np.float32)
        for sub in range(start, end, GPTQ_INNER):
            sub_end = min(sub + GPTQ_INNER, end)
            for r in range(sub, sub_end):
                row_s, row_z = s(order[r]), z(order[r])
                q[r] = np.clip(np.rint(work[r] / row_s) + row_z, qmin, qmax)
                errors[r - start] = (work[r] - (q[r] - row_z) * row_s) / upper[r, r]
                work[r + 1 : sub_end] -= np.outer(upper[r, r + 1 : sub_end], errors[r - start])
            if sub_end < end:  # the rest of the block at once
                work[sub_end:end] -= upper[sub:sub_end, sub_end:end].T @ errors[sub - start : sub_end - start]
        for rows in range(end, len(work), FEEDBACK_ROWS):  # a slab at a time: no [K, N] product temporary
            stop = min(rows + FEEDBACK_ROWS, len(work))
            work[rows:stop] -= upper[start:end, rows:stop].T @ errors
        feedback += float(np.sum(np.square(errors, dtype=np.float64)))
    del upper, work
    q = q[np.argsort(order)]
    return q, scale, zero_point, feedback - damping * _squared_error(w, q, scale, zero_point, spec, ~dead)


def _squared_error(w: np.ndarray, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec,
                   rows: np.ndarray) -> float:
    """||D||^2 over `rows` for D = dequantized(q) - w."""
    return sum(float(np.sum(np.square(d[rows], dtype=np.float64))) for d in error_slabs(w, q, scale, zero_point, spec))


def _row_params(values: np.ndarray, spec: QuantSpec):
    """Input channel k's scale (or zero point) over the outputs, looked up per row: GPTQ walks rows, and a scale
    expanded to the weight's shape is one more weight-sized array (271 MB for a 7B down projection)."""
    if spec.granularity == "block":
        return lambda k: values[k // spec.block_size]
    return lambda k: values

def clip_search(w: np.ndarray, h: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Shrink each output column's range by the ratio that minimises its error d^T H d (columns are independent;
    a per-tensor scale gets one ratio for the whole tensor)."""
    axis, block = node_axis(spec), spec.block_size
    w = w.astype(np.float32, copy=False)
    scale, zero_point = weight_qparams(w, spec, axis)[1:]
    # scale and zero point expanded once, all in float32 (DequantizeLinear's arithmetic); each ratio then costs a
    # few passes over the weight besides its error product
    full_scale = expand_scale(scale, w.shape, axis, block)
    z = expand_scale(zero_point.astype(np.float32), w.shape, axis, block)
    qmin, qmax = INT_RANGES[spec.dtype]
    best_err = np.full(w.shape[1], np.inf)
    best_q, best_scale, best_ratio = None, np.array(scale, dtype=np.float64), np.ones(w.shape[1])
    for ratio in CLIP_RATIOS:
        ratio_scale = full_scale * np.float32(ratio)
        q = np.clip(np.rint(w / ratio_scale) + z, qmin, qmax)
        d = ((q - z) * ratio_scale - w).astype(h.dtype, copy=False)
        err = np.sum((h @ d) * d, axis=0, dtype=np.float64)
        if spec.granularity == "tensor":
            err = np.full_like(err, err.sum())
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q = q.copy() if best_q is None else np.where(better[None, :], q, best_q)
        best_scale = np.where(better, scale * ratio, best_scale) if spec.granularity != "tensor" else \
            (scale * ratio if better.all() else best_scale)
        best_ratio = np.where(better, ratio, best_ratio)
    return best_q, np.asarray(best_scale, dtype=np.float32), zero_point, float(np.mean(best_ratio))


def to_initializer(note: QuantAnnotation, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec):
    dtype = np.int8 if spec.dtype in ("int8", "int4") else np.uint8
    if spec.granularity == "block":
        scale, zero_point = initializer_layout(note, scale), initializer_layout(note, zero_point)
    # the integers and their scales wait for InsertQDQPass in the scratch file when spilling (a 1.5B model's GPTQ
    # integers are 1.4 GB; a 7B model's block-32 scales alone ~1 GB)
    return (spill(ir.tensor(initializer_layout(note, q).astype(dtype))), spill(ir.tensor(scale.astype(np.float32))),
            spill(ir.tensor(zero_point.astype(dtype))))


def awq_scale(members: list[Member], h: np.ndarray) -> tuple[np.ndarray, float]:
    """s = rms(x_j)^alpha (normalised), alpha from a grid by the summed weight-rounding error in original space."""
    rms = np.sqrt(np.maximum(np.diag(h), 1e-12))
    weights = [(note, weight_matrix(note, np.float32)) for _, note in members]  # read once, not once per alpha
    errors = {}
    for alpha in AWQ_ALPHAS:
        s = rms**alpha
        s = s / np.sqrt(s.max() * s.min())
        errors[alpha] = (sum(rounding_error(note, w, h, s) for note, w in weights), s)
    alpha = min(errors, key=lambda a: errors[a][0])
    return errors[alpha][1], float(alpha)


def round_group(graph: ir.Graph, name: str, members: list[Member], stats: dict, consume: bool = False) -> dict:
    """GPTQ / AWQ for one layer group (the layers reading activation `name`), from its statistics; the records.
    `consume`: the group's Gram is not read after this, so its last GPTQ layer may factor it in place."""
    chosen = [(n, note) for n, note in members if note.weight_spec.algorithm != "rtn"]
    if not chosen or "gram" not in stats:
        return {}
    record = {}
    # plain round-to-nearest error of the untouched weights: the baseline every algorithm is reported against
    plain = {node.name: rounding_error(note, weight_matrix(note, np.float32), stats["gram"].mean) for node, note in chosen
             if note.weight.const_value.shape.rank() == 2}
    scaled = any(note.weight_spec.algorithm == "awq" for _, note in chosen) and _scalable(graph, members)
    if scaled:
        s, alpha = awq_scale(members, stats["gram"].mean)
        record[f"{name} (awq scale)"] = {"alpha": alpha, "applied": apply_channel_scale(graph, graph_value(members), members, s)}
        update_statistics(stats, s)
    h = stats["gram"].mean
    factors = _shared_factors(h, chosen)
    for node, note in chosen:
        if note.weight.const_value.shape.rank() != 2:
            record[node.name] = {"algorithm": "rtn", "why": "weight is not 2-D"}
            continue
        # unscaled weights: their plain error is the one to beat (each d^T H d of a 7B down projection is 2.6 TFLOP)
        last = consume and node is chosen[-1][0]
        upper = factors.get(_factor_key(note.weight_spec))
        record[node.name] = RoundWeightsPass._round(note, h, None if scaled else plain[node.name], last, upper) | \
            {"error_rtn": plain[node.name]}
        release(note.weight.const_value)  # a memory-mapped source weight: its pages leave the process
    return record


def _factor_key(spec: QuantSpec) -> tuple:
    return spec.act_order, spec.damping


def _shared_factors(h: np.ndarray, chosen: list[Member]) -> dict[tuple, np.ndarray]:
    """GPTQ's factor of H once for the layers of a group that would each compute the same one (gate/up: two
    Cholesky factorizations and triangular inverses become one; unfused q/k/v: three); a factor only one layer
    uses is left to it (it may factor H in place: a 7B down projection's H is 1.4 GB)."""
    keys = [_factor_key(note.weight_spec) for _, note in chosen
            if note.weight_spec.algorithm == "gptq" and note.weight.const_value.shape.rank() == 2]
    specs = {_factor_key(note.weight_spec): note.weight_spec for _, note in chosen}
    return {key: gptq_factor(h, specs[key]) for key in sorted(set(keys)) if keys.count(key) > 1}


def _record(model: ir.Model, layers: dict) -> None:
    # In-sample figures: errors are tr(D^T H D) on the calibration statistics the algorithms optimised.
    model.meta[ROUNDING] = {"measured_on": "calibration statistics (in-sample)",
                            "layers": dict(sorted(layers.items()))} if layers else {}


def rounded_layers(model: ir.Model) -> dict:
    return dict(model.meta.get(ROUNDING, {}).get("layers", {}))


class EagerGptq:
    """Segmented calibration's hook: GPTQ for each group whose statistics just finished, then its Gram is dropped
    (not kept in memory or written to scratch for later): a big model needs one segment's Grams at a time, not
    every layer's (a 7B decoder's float32 Grams are ~45 GB). GPTQ leaves the float weights as they are, so the
    segments still to run compute what they would have; groups with AWQ (which rescales weights and the norm
    before them) wait for RoundWeightsPass like everything else."""

    def __init__(self) -> None:
        self._groups: dict | None = None  # one compile's layer groups: found once, not at every segment
        self._takes: set[str] = set()

    @staticmethod
    def takes(model: ir.Model, groups: dict | None = None) -> set[str]:
        """The activations whose groups it rounds: GPTQ is the only data-driven algorithm among their layers."""
        return {name for name, members in (groups or layer_groups(model.graph)).items()
                if {note.weight_spec.algorithm for _, note in members} - {"rtn"} == {"gptq"}}

    def __call__(self, model: ir.Model, finished: dict[str, dict]) -> None:
        if self._groups is None:
            self._groups = layer_groups(model.graph)
            self._takes = self.takes(model, self._groups)
        groups, takes = self._groups, self._takes
        layers = rounded_layers(model)
        for name, collectors in sorted(finished.items()):
            if name in takes and "gram" in collectors and "absmax" not in collectors:
                layers |= round_group(model.graph, name, groups[name], collectors, consume=True)
                del collectors["gram"]
        _record(model, layers)


def rounded_weights(graph: ir.Graph):
    """Sequential GPTQ's view of the weights: `dequantized(value)` is what the compiled model computes with for a
    quantized layer's weight (GPTQ's integers where a group was already rounded, else round-to-nearest),
    dequantized to float32 in the initializer's layout; None for weights that stay float."""
    readers: dict[str, list[QuantAnnotation]] = {}
    for _, note in annotated_nodes(graph):
        readers.setdefault(note.weight.name, []).append(note)

    def dequantized(value: ir.Value) -> np.ndarray | None:
        notes = readers.get(value.name)
        if not notes:
            return None
        # a weight read by several nodes (a tied table) gets the integers any of them was given (as InsertQDQPass)
        note = next((n for n in notes if n.precomputed is not None), notes[0])
        if note.precomputed is not None:
            q, scale, zero_point = note.chosen_weights()
        else:
            q, scale, zero_point = weight_qparams(value.const_value.numpy().astype(np.float32), note.weight_spec, note.axis)
        return dequantize_weight(q, scale, zero_point, note.axis, note.weight_spec.block_size).astype(np.float32)

    return dequantized


class RoundWeightsPass(ir.passes.InPlacePass):
    """GPTQ and AWQ for the layers whose recipe asks for them (before range calibration: AWQ rescales X). Groups
    segmented calibration already rounded (`EagerGptq`) have no Gram left and are passed over."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, all_stats = model.graph, model.meta.get(LAYER_STATS, {})
        layers = rounded_layers(model)
        for name, members in sorted(layer_groups(graph).items()):
            layers |= round_group(graph, name, members, all_stats.get(name, {}))
        _record(model, layers)
        return ir.passes.PassResult(model, modified=bool(layers))

    @staticmethod
    def _round(note: QuantAnnotation, h: np.ndarray, before: float | None = None, consume: bool = False,
               upper: np.ndarray | None = None) -> dict:
        """`before`: the round-to-nearest error d^T H d of these weights where the caller has it; `consume`:
        GPTQ may factor H in its own buffer (the caller's last use of it); `upper`: GPTQ's factor of H, shared."""
        spec, w = note.weight_spec, weight_matrix(note, np.float32)
        before = rounding_error(note, w, h) if before is None else before
        if spec.algorithm == "gptq":
            info = {"algorithm": "gptq", "act_order": spec.act_order}
            try:
                q, scale, zero_point, after = gptq_with_error(w, h, spec, consume and upper is None, upper)
            except np.linalg.LinAlgError:  # only where H was consumed: no copy left for the float64 retry
                return info | {"used": "rtn", "error_algorithm": before,
                               "why": "H + damping is not positive definite in float32"}
        else:
            q, scale, zero_point, ratio = clip_search(w, h, spec)
            info = {"algorithm": "awq", "mean_clip_ratio": ratio}
            after = weighted_error(h, w, q, scale, zero_point, spec)
        if after > before:  # never worse than round-to-nearest of the same (possibly AWQ-scaled) weights
            return info | {"used": "rtn", "error_algorithm": before}
        note.precomputed = to_initializer(note, q, scale, zero_point, spec)
        return info | {"used": spec.algorithm, "error_algorithm": after}


def graph_value(members: list[Member]) -> ir.Value:
    return members[0][0].inputs[0]
