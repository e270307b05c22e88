"""Segmented calibration: run the float graph a slice at a time, so ONNX Runtime holds one slice's weights, not the
whole model's (issue: a 7B decoder is 30 GB of float32; one flat calibration session needs all of it at once).

The graph's nodes, in topological order, are cut into consecutive segments of at most `segment_bytes` of weights
(a transformer cuts between layers or inside one; nothing here depends on its structure). Each segment becomes
a model of its own: its inputs are the values it reads that earlier segments (or the caller) produced, its
outputs the values later segments read, the graph outputs it produces that the next run needs (a decoder's
presents), and the observed activations it produces. Segments run in order over every calibration run (each
window's prefill and decode steps), handing their boundary values to the next segment; a decoder's past inputs
are fed, segment by segment, with the presents the same segment returned on the run before, exactly as the flat
loop does. What the observers see is the same values in the same sample order (tests: equal to the flat run).

Large weights reach ONNX Runtime through `SessionOptions.add_external_initializers` (OrtValues over the arrays
qtc already holds, often memory-mapped external data; the segment's proto names them without bytes), so no segment is ever serialized with its
weights and the 2 GB protobuf limit does not apply. Peak memory: one segment's weights (plus ORT's pre-packed
copies), the boundary values of every calibration run (a transformer: the residual stream, the mask, the rotary
tables; [S, vocab] logits are never kept unless observed), and the observers. A boundary value whose copies for
every window would pass a small share of the segment budget waits in a scratch file instead (`_OnDisk`): a 7B
layer cut between its MLP projections hands over an 18,944-wide activation, 1.2 GB for 64 windows.
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnxruntime as ort

from qtc.backends.base import Backend
from qtc.backends.compare import needed_nodes
from qtc.calibration.data import CalibrationSet, fit_past, model_inputs, token_input, window_runs
from qtc.util.progress import progress_bar
from qtc.util.spill import release, trim_heap

_INLINE_BYTES = 1 << 16  # smaller initializers travel inside the segment's proto (with their bytes: serializing
# an external tensor would keep only its file reference)
Substitute = Callable[[ir.Value], "np.ndarray | None"]


class _OnDisk:
    """A boundary value in a scratch .npy until a segment reads it; the file goes with the last reference."""

    def __init__(self, array: np.ndarray, path: Path) -> None:
        np.save(path, array)
        self.path = path

    def array(self) -> np.ndarray:
        return np.load(self.path)

    def __del__(self) -> None:
        self.path.unlink(missing_ok=True)


class _Boundaries:
    """Where the boundary values a segment hands on wait: in memory, or on disk for a value whose copies over
    all windows would pass `budget` bytes."""

    def __init__(self, budget: int, windows: int) -> None:
        self.budget, self.windows = budget, max(windows, 1)
        self._folder: tempfile.TemporaryDirectory | None = None
        self._count = itertools.count()

    def keep(self, value: np.ndarray) -> "np.ndarray | _OnDisk":
        if value.nbytes * self.windows <= self.budget:
            return value
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="qtc-boundary-")
        return _OnDisk(value, Path(self._folder.name) / f"{next(self._count)}.npy")


def _loaded(value: "np.ndarray | _OnDisk") -> np.ndarray:
    return value.array() if isinstance(value, _OnDisk) else value


@dataclass
class Segment:
    nodes: list[ir.Node]
    inputs: list[ir.Value]  # computed elsewhere (graph inputs or earlier segments)
    outputs: list[ir.Value]  # read later, needed by the next run (presents), or observed
    weights: list[ir.Value]  # initializers its nodes read
    weight_bytes: int


def _initializer_bytes(value: ir.Value) -> int:
    tensor = value.const_value
    return int(tensor.nbytes) if tensor is not None else 0


def split_segments(graph: ir.Graph, segment_bytes: int, keep: set[str],
                   held: dict[str, int] | None = None) -> list[Segment]:
    """Cut the (topologically sorted) graph into segments of at most `segment_bytes` each (a node whose own cost
    exceeds it gets a segment alone). A node costs its weights' bytes plus `held[name]` for each value it produces
    that the caller keeps state for while the segment runs (a K x K Gram per observed layer input: 321 MB for an
    8,960-wide one, more than that layer's weights). `keep`: value names that must leave the segment producing
    them even if nothing later reads them (observed activations, presents)."""
    held = held or {}
    groups, current, size = [], [], 0
    for unit in _weights_with_readers(list(graph)):  # a node, after the nodes computing its inputs from weights alone
        own = sum(_initializer_bytes(v) for node in unit for v in node.inputs if v is not None and v.is_initializer())
        own += sum(held.get(v.name, 0) for node in unit for v in node.outputs)
        if current and size + own > segment_bytes:
            groups.append(current)
            current, size = [], 0
        current.extend(unit)
        size += own
    if current:
        groups.append(current)
    position = {id(node): i for i, group in enumerate(groups) for node in group}
    segments = []
    for index, group in enumerate(groups):
        produced = [v for node in group for v in node.outputs]
        later = [v for v in produced if v.name in keep or any(position[id(user)] > index for user, _ in v.uses())]
        needed = needed_nodes(graph, later)
        group = [node for node in group if node in needed]  # ORT would run them all (a logits-only LM head)
        reads, weights, seen = [], [], set()
        for node in group:
            for value in node.inputs:
                if value is None or id(value) in seen:
                    continue
                seen.add(id(value))
                producer = value.producer()
                if value.is_initializer():
                    weights.append(value)
                elif producer is None or position[id(producer)] != index:
                    reads.append(value)
        segments.append(Segment(group, reads, later, weights, sum(_initializer_bytes(w) for w in weights)))
    return segments


def _weights_with_readers(nodes: list[ir.Node]) -> list[list[ir.Node]]:
    """The nodes as units that stay in one segment, in an order that is still topological: a node computed from
    weights alone (a tied LM head's Transpose of the embedding table) joins its first reader, whose segment it
    moves to; its output would otherwise cross segments once per calibration run (gemma-3-270m: a [640, 262144]
    table, 671 MB a run)."""
    from_weights: set[int] = set()
    for node in nodes:
        if node.inputs and not any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                   for attr in node.attributes.values()) and all(
                value is None or value.is_initializer() or (value.producer() is not None
                                                            and id(value.producer()) in from_weights)
                for value in node.inputs):
            from_weights.add(id(node))
    placed: set[int] = set()

    def with_inputs(node: ir.Node) -> list[ir.Node]:
        unit = []
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in from_weights and id(producer) not in placed:
                unit += with_inputs(producer)
        placed.add(id(node))
        return unit + [node]

    units = [with_inputs(node) for node in nodes if id(node) not in from_weights]
    return units + [[node] for node in nodes if id(node) not in placed]  # read by nothing: at the end


def _value_info(value: ir.Value) -> onnx.ValueInfoProto:
    return ir.serde.serialize_value(value)


def _placeholder(weight: ir.Value) -> onnx.TensorProto:
    """An initializer entry without its bytes: `add_external_initializers` supplies them when the session loads."""
    tensor = onnx.TensorProto(name=weight.name, data_type=int(weight.const_value.dtype),
                              dims=list(weight.const_value.shape), data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", "qtc-supplied-at-load"), ("offset", "0"), ("length", str(weight.const_value.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


class SegmentSession:
    """One segment as an ONNX Runtime session; big weights handed over as OrtValues, not copied into a proto."""

    def __init__(self, model: ir.Model, segment: Segment, make_options: Callable[[], ort.SessionOptions],
                 providers: list, substitute: Substitute | None = None) -> None:
        """`substitute(weight)`: the array to run instead of a weight's own (None: its own)."""
        def array(weight: ir.Value) -> np.ndarray:
            replaced = substitute(weight) if substitute is not None else None
            return np.ascontiguousarray(weight.const_value.numpy() if replaced is None else replaced)

        small = [w for w in segment.weights if _initializer_bytes(w) <= _INLINE_BYTES]
        large = [w for w in segment.weights if _initializer_bytes(w) > _INLINE_BYTES]
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(node) for node in segment.nodes], "qtc_segment",
            [_value_info(v) for v in segment.inputs], [_value_info(v) for v in segment.outputs],
            [onnx.numpy_helper.from_array(array(w), w.name) for w in small] + [_placeholder(w) for w in large])
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(domain, version)
                                                             for domain, version in sorted(model.opset_imports.items())])
        proto.ir_version = model.ir_version
        options = make_options()
        arrays = [array(w) for w in large]
        self._keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # must outlive the session
        if large:
            options.add_external_initializers([w.name for w in large], self._keep)
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
        self.inputs = [v.name for v in segment.inputs]
        self.outputs = [v.name for v in segment.outputs]

    def run(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: _loaded(values[name]) for name in self.inputs}
        return dict(zip(self.outputs, self.session.run(self.outputs, feed)))


def stream_segmented(model: ir.Model, backend: Backend, calib: CalibrationSet, names: set[str],
                     segment_bytes: int, label: str, quiet: bool,
                     finished: Callable[[set[str]], None] | None = None,
                     held: dict[str, int] | None = None,
                     quantized: Substitute | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Like passes.calibrate.stream_activations, segment by segment: yields, per segment and calibration run (in
    sample order), the observed activations that segment produced (graph inputs with the first segment).
    `finished(names)` is called when no later segment will yield those names again; `held`: bytes of state the
    caller keeps per observed name until then (see split_segments). With `quantized` (sequential GPTQ), each
    segment runs a second time after `finished`, with the weights `quantized` gives (the rounding `finished`
    just chose), and later segments read what that run computes: every segment's statistics come from the
    quantized segments before it."""
    inputs = model_inputs(model)
    past_to_present = {spec.name: spec.present for spec in inputs if spec.present is not None}
    presents = set(past_to_present.values())
    # per run: graph inputs (pasts only for prefills), its kind, the windows it finishes
    runs = _graph_feeds(calib, inputs, bool(past_to_present))
    segments = split_segments(model.graph, segment_bytes, set(names) | presents, held)
    graph_inputs = {spec.name for spec in inputs}
    carried = [dict(feed) for feed, _, _ in runs]
    passes = 2 if quantized is not None else 1
    boundaries = _Boundaries(segment_bytes // 4, calib.n_samples)  # a quarter of a segment's weights at most
    with progress_bar(label, total=passes * len(segments) * calib.n_samples, quiet=quiet) as advance:
        for index, segment in enumerate(segments):
            later = {v.name for s in segments[index + 1:] for v in s.inputs}
            where = f"segment {index + 1}/{len(segments)}"
            if not segment.outputs:  # e.g. the LM head: nothing observed, nothing read later
                for _ in range(passes * calib.n_samples):
                    advance(where)
                continue
            fed = [dict(values) for values in carried] if quantized is not None else []  # the re-run's inputs
            session = SegmentSession(model, segment, backend.session_options, backend.providers())
            for number, values, produced in _run_segment(session, carried, runs, inputs, presents):
                seen = {k: v for k, v in produced.items() if k in names}
                if index == 0:
                    seen.update({k: values[k] for k in names & graph_inputs if k in values})
                if seen:
                    yield seen
                values.update({k: boundaries.keep(v) for k, v in produced.items() if k in later})
                for name in [k for k in values if k not in later]:
                    del values[name]  # what no later segment reads (pasts this segment used, logits, ...)
                for _ in range(runs[number][2]):
                    advance(where)
            del session
            _release(segment)
            if finished is not None:
                finished({v.name for v in segment.outputs} & names | (names & graph_inputs if index == 0 else set()))
            if quantized is not None and later:
                session = SegmentSession(model, segment, backend.session_options, backend.providers(), quantized)
                for number, _, produced in _run_segment(session, fed, runs, inputs, presents):
                    carried[number].update({k: boundaries.keep(v) for k, v in produced.items() if k in later})
                    for _ in range(runs[number][2]):
                        advance(f"{where}, quantized")
                del session, fed
                _release(segment)
            elif quantized is not None:
                for _ in range(calib.n_samples):
                    advance(where)


def _release(segment: Segment) -> None:
    """Drop the weights' mappings and the closed session's freed heap: RSS stays near one segment, not the model."""
    for weight in segment.weights:
        release(weight.const_value)
    trim_heap()


def _run_segment(session: SegmentSession, carried: list[dict], runs: list, inputs,
                 presents: set[str]) -> Iterator[tuple[int, dict, dict]]:
    """One segment over every calibration run, in order: yields (run number, the values it was fed, what it
    produced). A decode step's pasts are this segment's presents from the run before; a group's first decode
    step's, those of the group's prefills stacked (calibration/data.py:window_runs)."""
    previous: dict[str, np.ndarray] = {}
    prefilled: list[dict[str, np.ndarray]] = []
    for number, values in enumerate(carried):
        feed, kind, _ = runs[number]
        if kind == "first step":
            stacked = {name: np.concatenate([p[name] for p in prefilled]) for name in prefilled[0]}
            values.update(_carried_pasts(stacked, feed, inputs))
            prefilled = []
        elif kind == "step":
            values.update(_carried_pasts(previous, feed, inputs))
        produced = session.run(values)
        previous = {k: v for k, v in produced.items() if k in presents}
        if kind == "prefill":
            prefilled.append(previous)
        yield number, values, produced


def _carried_pasts(previous: dict[str, np.ndarray], feed: dict[str, np.ndarray], inputs) -> dict[str, np.ndarray]:
    """A decode step's pasts: this segment's presents from the run before, in the form their kernel takes (the
    valid length is what the attention mask covers before the new tokens)."""
    new = feed[token_input(inputs).name].shape[1]
    mask = next((feed[spec.name] for spec in inputs if "mask" in spec.name and spec.name in feed), None)
    valid = mask.shape[1] - new if mask is not None else 0  # without a mask no kernel has a capacity (gqa_fusion)
    return {spec.name: fit_past(spec, previous[spec.present], valid, new)
            for spec in inputs if spec.present is not None and spec.present in previous}


def _graph_feeds(calib: CalibrationSet, inputs, kv: bool) -> list[tuple[dict[str, np.ndarray], str, int]]:
    """Every calibration run's graph-input feed in the flat loop's order, its kind (a prefill's pasts are the empty
    cache; a decode step's come from the runs before) and the windows it finishes."""
    if not (kv and calib.kind == "text"):
        return [(window, "window", 1) for window in calib.feeds(inputs)]
    return [(feed if kind == "prefill" else {k: v for k, v in feed.items() if not _is_past(k, inputs)}, kind, done)
            for feed, _, kind, done in window_runs(calib.feeds(inputs), inputs, _EmptyPresents(inputs))]


def _is_past(name: str, inputs) -> bool:
    return any(spec.name == name and spec.present is not None for spec in inputs)


class _EmptyPresents:
    """window_runs' `run`: the step feeds' graph inputs do not depend on the model's outputs except the presents,
    which segmented calibration supplies itself; a placeholder present (an empty cache of rank 4, as fit_past
    slices) lets window_runs build the next feed."""

    def __init__(self, inputs) -> None:
        self.presents = [spec.present for spec in inputs if spec.present is not None]

    def __call__(self, feed: dict) -> dict:
        return {name: np.zeros((1, 1, 0, 1), np.float32) for name in self.presents}
