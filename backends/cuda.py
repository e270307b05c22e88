"""ORT's CUDA execution provider (onnxruntime-gpu). Compiling for it fuses into the com.microsoft contrib ops
CUDA implements (passes/fusion.py) and needs no legalization: CUDA runs opset-21 Q/DQ and fuses block
DQ -> MatMul into MatMulNBits, but leaves QDQ MatMuls as DequantizeLinear + float MatMul (the w8a8 numerics
are emulated). A build machine without a GPU cross-compiles: calibration runs on ORT CPU (see measuring_backend)."""

from __future__ import annotations

from dataclasses import dataclass

from qtc.backends.base import Backend
from qtc.backends.cpu import CPU


@dataclass(frozen=True)
class CudaBackend(Backend):
    def measuring_backend(self) -> Backend:
        # GPUs are rarely where models are prepared: without one, calibration and the float comparison run the same
        # float graph on ORT CPU (ranges of the same tensors; summation order aside). The report's
        # `calibrated_on` and target notes say so.
        return self if self.availability()[0] else CPU


CUDA = CudaBackend(
    name="cuda",
    provider="CUDAExecutionProvider",
    provider_options={"device_id": "0"},
    recipes_native=("w8a16", "w4a16"),
    dynamic_activations_for_int4=True,
)
