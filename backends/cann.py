"""ORT's CANN execution provider (onnxruntime-cann, Huawei Ascend). Facts: ../shared/docs/cann-ep.md.

Provider options are validated against the 1.24.4 set with their defaults, and `precision_mode` is recorded in
every report: allow_mix_precision / allow_fp32_to_fp16 collapsed accuracy in a public report (Ascend/pytorch#125);
must_keep_origin_dtype kept it.
"""

from __future__ import annotations

from qtc.backends.base import Backend
from qtc.errors import QtcError

CANN_OPTIONS = {
    "device_id": "0",
    "npu_mem_limit": str(2**64 - 1),
    "arena_extend_strategy": "kNextPowerOfTwo",
    "enable_cann_graph": "1",
    "enable_cann_subgraph": "0",
    "dump_graphs": "0",
    "dump_om_model": "1",
    "precision_mode": "",
    "op_select_impl_mode": "",
    "optypelist_for_implmode": "",
}
CHOICES = {
    "arena_extend_strategy": ("kNextPowerOfTwo", "kSameAsRequested"),
    "enable_cann_graph": ("0", "1"),
    "enable_cann_subgraph": ("0", "1"),
    "dump_graphs": ("0", "1"),
    "dump_om_model": ("0", "1"),
    "precision_mode": ("", "force_fp32", "cube_fp16in_fp32out", "force_fp16", "allow_fp32_to_fp16",
                       "must_keep_origin_dtype", "allow_mix_precision", "allow_mix_precision_fp16"),
    "op_select_impl_mode": ("", "high_precision", "high_performance"),
}


def cann_options(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Defaults plus overrides; unknown options and values outside the documented choices are errors."""
    options = dict(CANN_OPTIONS)
    for key, value in (overrides or {}).items():
        if key not in CANN_OPTIONS:
            raise QtcError(f"unknown CANN provider option {key!r} (known: {', '.join(CANN_OPTIONS)})")
        value = str(value)
        if key in CHOICES and value not in CHOICES[key]:
            raise QtcError(f"CANN option {key}={value!r} is not one of {', '.join(repr(c) for c in CHOICES[key])}")
        options[key] = value
    return options


CANN = Backend(
    name="cann",
    provider="CANNExecutionProvider",
    provider_options=cann_options({"precision_mode": "must_keep_origin_dtype"}),
    recipes_native=(),
    compiles=False,
)
