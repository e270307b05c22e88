"""qtc's calibration windows as an ONNX Runtime `CalibrationDataReader`, so that ORT's own quantizers
(`quantize_static`, `MatMulNBitsQuantizer` with GPTQ) see exactly the windows qtc calibrates on, in the same order:
the side-by-side comparisons in bench/ depend on it."""

from __future__ import annotations

import itertools

from onnxruntime.quantization import CalibrationDataReader

from qtc.calibration.data import CalibrationSet, InputSpec


class CalibrationReader(CalibrationDataReader):
    """The first `limit` calibration feeds (or all); deep-copyable, because ORT's GPTQ path deep-copies the reader
    before iterating it and a live generator cannot be copied."""

    def __init__(self, calib: CalibrationSet, inputs: list[InputSpec], limit: int | None = None) -> None:
        self.calib, self.inputs, self.limit = calib, inputs, limit
        self.rewind()

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = itertools.islice(self.calib.feeds(self.inputs), self.limit)

    def __deepcopy__(self, memo):
        return type(self)(self.calib, self.inputs, self.limit)
