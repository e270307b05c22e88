"""What every execution-provider backend offers: sessions on real ONNX Runtime, and what it can run."""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort



@dataclass(frozen=True)
class Backend:
    """One ORT execution provider as a qtc target."""

    name: str
    provider: str
    provider_options: dict = field(default_factory=dict)
    recipes_native: tuple[str, ...] = ()

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # ORT's warnings about unused initializers etc. are noise to our users
        # Fixed thread count: calibration ranges and reports must not depend on how busy the machine is.
        options.intra_op_num_threads = int(os.environ.get("QTC_THREADS", min(os.cpu_count() or 1, 8)))
        return options

    def session(self, model: str | os.PathLike | bytes | ir.Model) -> ort.InferenceSession:
        if isinstance(model, ir.Model):
            return self._session_from_ir(model)
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        return ort.InferenceSession(model, self.session_options(), providers=[self.provider])

    def _session_from_ir(self, model: ir.Model) -> ort.InferenceSession:
        # Through a temporary folder with external data: the model may be > 2 GiB, and may still point at the
        # source's external data files, which a serialized protobuf in memory cannot carry.
        with tempfile.TemporaryDirectory(prefix="qtc-session-") as folder:
            path = Path(folder) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return self.session(path)


@functools.cache
def max_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime loads, found by loading a one-node model.

    The onnx package can write IR versions newer than the runtime reads (onnx 1.23 writes 14, ORT 1.31
    reads 13), so qtc asks the runtime rather than trusting a table.
    """
    for version in range(onnx.IR_VERSION, 6, -1):
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
        node = ir.node("Identity", [x], outputs=[ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))])
        graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 13})
        try:
            ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=version)).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
            return version
        except Exception:  # ORT raises its own Fail/InvalidGraph types for unsupported IR versions
            continue
    raise RuntimeError("onnxruntime loads no IR version >= 7")
