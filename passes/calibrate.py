"""Calibration: run the float graph on real samples through ONNX Runtime and record activation ranges.

Streaming: each sample's activations go to fixed-size observers and are dropped, so memory does not grow with
the number of samples. Ranges land in `model.meta[RANGES]` keyed by `activation_key`.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir

from qtc.backends.base import Backend
from qtc.backends.compare import session_with_outputs
from qtc.calibration.data import CalibrationSet, model_inputs, window_runs
from qtc.calibration.moments import ChannelAbsMax, ChannelRange, Gram, buffer_rows
from qtc.calibration.observers import MinMaxObserver, make_observer
from qtc.errors import QtcError
from qtc.passes.annotate import activations_to_observe, annotated_nodes
from qtc.passes.meta import GRAM_DIR, LAYER_STATS, OBSERVERS, RANGES, SEGMENTED, smoothing_of
from qtc.passes.rounding import EagerGptq, rounded_weights
from qtc.passes.segments import Substitute, stream_segmented
from qtc.passes.smooth import unscaled
from qtc.recipes import QuantSpec, SmoothSpec
from qtc.util.progress import progress_bar


def stream_activations(model: ir.Model, backend: Backend, calib: CalibrationSet, names: set[str], label: str,
                       quiet: bool, segment_bytes: int | None = None,
                       finished: Callable[[set[str]], None] | None = None,
                       held: dict[str, int] | None = None,
                       quantized: Substitute | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield {name: activation} for each calibration sample, one sample at a time (nothing accumulates here).
    With `segment_bytes`, the graph runs a slice at a time (passes/segments.py) and each dict holds the names
    one slice produced; every name still sees its samples in order (`quantized`: each slice then re-runs with
    those weights for the slices after it, see stream_segmented)."""
    if segment_bytes is not None:
        model.meta[SEGMENTED] = {**model.meta.get(SEGMENTED, {}), "segment_bytes": segment_bytes,
                                 **({"sequential_gptq": True} if quantized else {})}
        yield from stream_segmented(model, backend, calib, names, segment_bytes, label, quiet, finished, held,
                                    quantized)
        return
    inputs = model_inputs(model)
    outputs = sorted(n for n in names if n not in {v.name for v in model.graph.inputs})
    # A KV-cache decoder also calibrates on decode steps fed its own presents (calibration/data.py:window_runs).
    presents = sorted({spec.present for spec in inputs if spec.present is not None} - set(outputs))
    fetched = outputs + presents
    # only what is fetched is computed: not the logits (gemma-3-270m's LM head is half its forward)
    session = session_with_outputs(backend, model, fetched, only=True) if fetched else None

    def run(feed: dict) -> dict:
        return dict(zip(fetched, session.run(fetched, feed))) if fetched else {}

    if presents and calib.kind == "text":
        runs = window_runs(calib.feeds(inputs), inputs, run)
    else:
        runs = ((window, run(window), "window", 1) for window in calib.feeds(inputs))
    with progress_bar(label, total=calib.n_samples, quiet=quiet) as advance:
        for feed, produced, _, finished in runs:
            produced = {k: produced[k] for k in outputs}
            produced.update({k: v for k, v in feed.items() if k in names})  # an activation may be a graph input
            yield produced
            for _ in range(finished):
                advance()


class CalibrationCache:
    """What the streaming passes measured, kept across compiles of one model on one calibration set.

    `qtc compile --max-drop` compiles the same model several times, only moving layers to weight-only; the layer
    statistics (taken before smoothing) and the ranges of the activations still quantized do not change, so later
    attempts stream only what is new. A range is reused only if its activation was smoothed the same way (the
    smoothing record of its layer group): smoothing rescales that activation and, up to float rounding, nothing
    downstream of it (which is why `qtc.compile_within` compiles its final recipe afresh).
    """

    def __init__(self) -> None:
        self.layer_stats: dict[str, dict] = {}  # activation name -> {"gram": Gram, "absmax": ChannelAbsMax}
        self.ranges: dict[tuple, tuple] = {}  # activation key -> (smoothing record, range, observer summary)

    def stats(self, name: str, needs: dict) -> dict | None:
        """A private copy (smoothing updates statistics in place) of the cached collectors, if they cover `needs`."""
        cached = self.layer_stats.get(name)
        return copy.deepcopy(cached) if cached is not None and set(needs) <= set(cached) else None


def _smoothing_of(model: ir.Model, value: ir.Value) -> str:
    return json.dumps(smoothing_of(model, value.name), sort_keys=True)


class CalibrateActivationsPass(ir.passes.InPlacePass):
    """Observe every activation the annotations ask for; requires annotations, ensures a range for each."""

    runs_model = True  # in ONNX Runtime sessions (a compile opens its checks' sessions only after such passes)

    def __init__(self, calib: CalibrationSet | None, backend: Backend, quiet: bool = False,
                 cache: CalibrationCache | None = None, segment_bytes: int | None = None) -> None:
        super().__init__()
        self.segment_bytes = segment_bytes
        self.calib = calib
        self.backend = backend
        self.quiet = quiet
        self.cache = cache

    def requires(self, model: ir.Model) -> None:
        if activations_to_observe(model.graph) and (self.calib is None or self.calib.n_samples == 0):
            # No silent random calibration: static activation ranges need real data.
            raise QtcError("this recipe quantizes activations statically and needs calibration data: pass --calib")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        wanted = activations_to_observe(model.graph)
        if not wanted:
            return ir.passes.PassResult(model, modified=False)
        smoothing = {key: _smoothing_of(model, value) for key, (value, _) in wanted.items()}
        known = {}
        if self.cache is not None:
            known = {key: hit[1:] for key in wanted if (hit := self.cache.ranges.get(key)) and hit[0] == smoothing[key]}
        derived = _derived_ranges(model, {key: hit for key, hit in wanted.items() if key not in known})
        known |= derived
        observers = {
            key: make_observer(spec.calibrator, percentile=spec.percentile, symmetric=spec.symmetric)
            for key, (_, spec) in wanted.items() if key not in known
        }
        names = {key: wanted[key][0].name for key in observers}
        if observers:
            for produced in stream_activations(model, self.backend, self.calib, set(names.values()), "calibrating",
                                               self.quiet, self.segment_bytes):
                for key, observer in observers.items():
                    if names[key] in produced:
                        observer.update(produced[names[key]])
        measured = {key: (obs.range(), obs.summary()) for key, obs in observers.items()}
        if self.cache is not None:
            self.cache.ranges.update({key: (smoothing[key], *found) for key, found in (measured | derived).items()})
        found = dict(sorted((known | measured).items(), key=lambda item: str(item[0])))
        model.meta[RANGES] = {key: value[0] for key, value in found.items()}
        model.meta[OBSERVERS] = {key: value[1] for key, value in found.items()}
        return ir.passes.PassResult(model, modified=False)

    def ensures(self, model: ir.Model) -> None:
        missing = set(activations_to_observe(model.graph)) - set(model.meta.get(RANGES, {}))
        if missing:
            raise ir.passes.PostconditionError(f"no range for {len(missing)} activations")


def _derived_ranges(model: ir.Model, wanted: dict[tuple, tuple[ir.Value, QuantSpec]]) -> dict[tuple, tuple]:
    """(range, observer summary) of each min/max activation whose per-channel range the statistics pass kept
    (rescaled with its channels if smoothing or AWQ divided them): what a MinMaxObserver streaming the smoothed
    graph would report, without that second run."""
    stats, derived = model.meta.get(LAYER_STATS, {}), {}
    for key, (value, spec) in wanted.items():
        channels = stats.get(unscaled(value).name, {}).get("range")
        if spec.calibrator != "minmax" or channels is None:
            continue
        observer = MinMaxObserver(symmetric=spec.symmetric)
        observer.count, observer.skipped = channels.count, channels.skipped
        observer.min, observer.max = channels.bounds()
        derived[key] = (observer.range(), observer.summary() | {"derived": "per-channel range from layer statistics"})
    return derived


class CollectLayerStatisticsPass(ir.passes.InPlacePass):
    """Second moments (X^T X) and per-channel max |x| of quantized layers' inputs, for SmoothQuant, GPTQ, AWQ.

    Only what the annotations ask for is kept: a Gram matrix for inputs of layers whose weights use a
    data-driven algorithm (or when smoothing picks alpha automatically), a channel max when smoothing.
    """

    runs_model = True

    def __init__(self, calib: CalibrationSet | None, backend: Backend, smooth: SmoothSpec | None, quiet: bool = False,
                 every_layer: bool = False, cache: CalibrationCache | None = None, segment_bytes: int | None = None,
                 eager: EagerGptq | None = None, sequential: bool = False, ranges: bool = False):
        super().__init__()
        # also keep each min/max-calibrated activation's per-channel range, so CalibrateActivationsPass derives
        # its range after smoothing / AWQ instead of running the graph again (only where this pass runs anyway)
        self.ranges = ranges
        self.segment_bytes = segment_bytes
        # segmented runs: called with each segment's finished statistics before they are offloaded (it may use
        # and drop them)
        self.eager = eager
        # segmented runs with `eager`: later segments read what the rounded segments compute (sequential GPTQ)
        self.sequential = sequential
        self.calib, self.backend, self.smooth, self.quiet = calib, backend, smooth, quiet
        self.every_layer = every_layer  # sensitivity analysis wants both statistics for every quantized layer
        self.cache = cache

    def _wanted(self, graph: ir.Graph) -> dict[str, dict]:
        wanted: dict[str, dict] = {}
        for node, note in annotated_nodes(graph):
            x = node.inputs[0]
            if x is None or x.const_value is not None:
                continue
            needs = wanted.setdefault(x.name, {})
            if self.every_layer or note.weight_spec.algorithm != "rtn" or (self.smooth and self.smooth.alpha == "auto"):
                needs.setdefault("gram", Gram())
            if self.every_layer or self.smooth:
                needs.setdefault("absmax", ChannelAbsMax())
        wanted = {name: needs for name, needs in wanted.items() if needs}
        if self.ranges and wanted:
            for value, spec in activations_to_observe(graph).values():
                if spec.calibrator == "minmax":
                    wanted.setdefault(value.name, {}).setdefault("range", ChannelRange())
        return dict(sorted(wanted.items()))

    def _offloader(self, model: ir.Model, collectors: dict[str, dict]) -> Callable[[set[str]], None]:
        """Segmented runs: each finished Gram goes to a scratch .npy (deleted with the model), so memory holds
        one segment's matrices, not every layer's; the `eager` hook sees them first."""
        folder = model.meta.setdefault(GRAM_DIR, tempfile.TemporaryDirectory(prefix="qtc-gram-"))
        count = itertools.count()
        eaten = self.eager.takes(model) if self.eager is not None else set()
        need = sum(size for name, size in _gram_bytes(model, collectors).items() if name not in eaten)
        free = shutil.disk_usage(folder.name).free
        if need > free:  # say so now, not after the calibration run fills the disk
            raise QtcError(f"segmented calibration needs {need / 1e9:.1f} GB of scratch space for its X^T X matrices "
                           f"in {Path(folder.name).parent} but {free / 1e9:.1f} GB are free: set TMPDIR to a larger disk")

        def offload(names: set[str]) -> None:
            if self.eager is not None:
                finished = {name: collectors[name] for name in sorted(names) if name in collectors}
                for stats in finished.values():
                    if "gram" in stats:
                        stats["gram"].finish()
                self.eager(model, finished)
            for name in sorted(names):
                if "gram" in collectors.get(name, {}):
                    collectors[name]["gram"].offload(Path(folder.name) / f"{next(count)}.npy")
        return offload

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        wanted = self._wanted(model.graph)
        if not wanted:
            return ir.passes.PassResult(model, modified=False)
        if self.calib is None or self.calib.n_samples == 0:
            raise QtcError("smoothing and GPTQ/AWQ rounding need calibration data: pass --calib")
        known = {}
        if self.cache is not None:
            known = {name: hit for name, needs in wanted.items() if (hit := self.cache.stats(name, needs)) is not None}
        missing = {name: needs for name, needs in wanted.items() if name not in known}
        if missing:
            offload = self._offloader(model, missing) if self.segment_bytes is not None else None
            quantized = rounded_weights(model.graph) if self.sequential else None
            for produced in stream_activations(model, self.backend, self.calib, set(missing), "layer statistics",
                                               self.quiet, self.segment_bytes, offload, _gram_bytes(model, missing, True),
                                               quantized):
                for name, collectors in missing.items():
                    for collector in collectors.values() if name in produced else ():
                        collector.update(produced[name])
            for collectors in missing.values():
                if "gram" in collectors:
                    collectors["gram"].finish()
            if self.cache is not None:
                self.cache.layer_stats.update(copy.deepcopy(missing))
        model.meta[LAYER_STATS] = dict(sorted((known | missing).items()))
        return ir.passes.PassResult(model, modified=False)


def _gram_bytes(model: ir.Model, collectors: dict[str, dict], buffered: bool = False) -> dict[str, int]:
    """Bytes of each float32 K x K Gram the collectors hold (by activation name; K from the value's last axis);
    `buffered`: with the rows it holds while calibration streams (what memory needs, where disk needs the sum)."""
    values = [v for node in model.graph for v in node.outputs] + list(model.graph.inputs)
    widths = {v.name: v.shape[-1] for v in values if v.name in collectors and v.shape is not None and v.shape.rank()}
    return {name: (widths[name] + (buffer_rows(widths[name]) if buffered else 0)) * widths[name] * 4
            for name, c in sorted(collectors.items()) if "gram" in c and isinstance(widths.get(name), int)}
