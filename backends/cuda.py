"""ORT's CUDA execution provider (onnxruntime-gpu). Compiling for it fuses into the com.microsoft contrib ops
CUDA implements (passes/fusion.py) and needs no legalization: CUDA runs opset-21 Q/DQ and fuses block
DQ -> MatMul into MatMulNBits, but leaves QDQ MatMuls as DequantizeLinear + float MatMul (the w8a8 numerics
are emulated)."""

from qtc.backends.base import Backend

CUDA = Backend(
    name="cuda",
    provider="CUDAExecutionProvider",
    provider_options={"device_id": "0"},
    recipes_native=("w8a16", "w4a16"),
    dynamic_activations_for_int4=True,
)
