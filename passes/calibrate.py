"""Calibration: run the float graph on real samples through ONNX Runtime and record activation ranges.

Streaming: each sample's activations go to fixed-size observers and are dropped, so memory does not grow with
the number of samples. Ranges land in `model.meta[RANGES]` keyed by `activation_key`.
"""

from __future__ import annotations

import onnx_ir as ir

from qtc.backends.base import Backend
from qtc.calibration.data import CalibrationSet, model_inputs
from qtc.calibration.observers import make_observer
from qtc.errors import QtcError
from qtc.passes.annotate import activations_to_observe
from qtc.progress import progress_bar

RANGES = "qtc.ranges"
OBSERVERS = "qtc.observers"


class CalibrateActivationsPass(ir.passes.InPlacePass):
    """Observe every activation the annotations ask for; requires annotations, ensures a range for each."""

    def __init__(self, calib: CalibrationSet | None, backend: Backend, quiet: bool = False) -> None:
        super().__init__()
        self.calib = calib
        self.backend = backend
        self.quiet = quiet

    def requires(self, model: ir.Model) -> None:
        if activations_to_observe(model.graph) and (self.calib is None or self.calib.n_samples == 0):
            # No silent random calibration: static activation ranges need real data.
            raise QtcError("this recipe quantizes activations statically and needs calibration data: pass --calib")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        wanted = activations_to_observe(model.graph)
        if not wanted:
            return ir.passes.PassResult(model, modified=False)
        observers = {
            key: make_observer(spec.calibrator, percentile=spec.percentile, symmetric=spec.symmetric)
            for key, (_, spec) in wanted.items()
        }
        values = {key: value for key, (value, _) in wanted.items()}
        session = self._session_with_outputs(model, sorted({v.name for v in values.values()}))
        inputs = model_inputs(model)
        with progress_bar("calibrating", total=self.calib.n_samples, quiet=self.quiet) as advance:
            for feed in self.calib.feeds(inputs):
                produced = dict(zip(self._output_names, session.run(self._output_names, feed)))
                produced.update(feed)  # an activation may be a graph input itself
                for key, observer in observers.items():
                    observer.update(produced[values[key].name])
                advance()
        model.meta[RANGES] = {key: obs.range() for key, obs in observers.items()}
        model.meta[OBSERVERS] = {key: obs.summary() for key, obs in observers.items()}
        return ir.passes.PassResult(model, modified=False)

    def _session_with_outputs(self, model: ir.Model, names: list[str]):
        """A session whose outputs are the wanted activations: graph outputs are added, then taken back."""
        graph = model.graph
        inputs = {v.name for v in graph.inputs}
        existing = {v.name for v in graph.outputs}
        by_name = {v.name: v for node in graph for v in node.outputs}
        extra = [by_name[n] for n in names if n not in existing and n not in inputs]
        graph.outputs.extend(extra)
        try:
            session = self.backend.session(model)
        finally:
            for _ in extra:
                graph.outputs.pop()
        self._output_names = [n for n in names if n not in inputs]
        return session

    def ensures(self, model: ir.Model) -> None:
        missing = set(activations_to_observe(model.graph)) - set(model.meta.get(RANGES, {}))
        if missing:
            raise ir.passes.PostconditionError(f"no range for {len(missing)} activations")
