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
    # How int8 QDQ is stored for this EP (same integer grid either way; see passes/qdq.py InsertQDQPass).
    unsigned_activations: bool = False
    unsigned_weights: bool = False

    def runtime_ops(self, model: ir.Model) -> dict[str, int]:
        """The op histogram after ORT's own graph optimizations: which kernels (and numerics) really run.

        E.g. block-int4 DequantizeLinear -> MatMul becomes com.microsoft::MatMulNBits on CPU; QDQ around a
        MatMul becomes QLinearMatMul / MatMulIntegerToFloat; what stays DequantizeLinear runs in float.
        """
        with tempfile.TemporaryDirectory(prefix="qtc-optimized-") as folder:
            source, optimized = Path(folder) / "model.onnx", Path(folder) / "optimized.onnx"
            ir.save(model, source, external_data="model.onnx.data")
            options = self.session_options()
            options.optimized_model_filepath = str(optimized)
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(str(source), options, providers=[self.provider])
            counts: dict[str, int] = {}
            for node in onnx.load(str(optimized), load_external_data=False).graph.node:
                key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

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
