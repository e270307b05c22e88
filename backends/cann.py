"""ORT's CANN execution provider (onnxruntime-cann, Huawei Ascend). Facts: ../shared/docs/cann-ep.md.

Provider options are validated against the 1.24.4 set with their defaults, and `precision_mode` is recorded in
every report: allow_mix_precision / allow_fp32_to_fp16 collapsed accuracy in a public report (Ascend/pytorch#125);
must_keep_origin_dtype kept it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from qtc.backends.base import Backend
from qtc.backends.cpu import CPU
from qtc.core.ops import op_key
from qtc.errors import QtcError
from qtc.recipes import Recipe

# What the CANN EP takes, read from the onnxruntime-cann wheel itself (tools/cann_wheel_check.py wrote the file from
# the provider library's kernel registry and from the op-name table that SupportONNXModel() reads), not transcribed.
_REGISTRY = json.loads(Path(__file__).with_name("cann_kernels.json").read_text(encoding="utf-8"))
REGISTRY_VERSION = _REGISTRY["onnxruntime_version"]
# Graph mode with enable_cann_subgraph=1: default-domain nodes on this list, at opset >= GRAPH_MIN_OPSET.
GRAPH_WHITELIST = frozenset(_REGISTRY["graph_whitelist"]["ops"])
GRAPH_MIN_OPSET = _REGISTRY["graph_whitelist"]["opset_lower_bound"]
# Q/DQ are expected on the host under the ORT CANN EP (Huawei's own route converts them with AMCT instead).
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Single-op mode (enable_cann_graph=0): op -> (since-version ranges, element types of its kernels). A range
# (since, until) is closed; until None is an open-ended "since N" registration, which ORT's kernel lookup matches
# only for nodes whose schema since-version is exactly N.
SINGLE_OP_KERNELS: dict[str, tuple[tuple[tuple[int, int | None], ...], tuple[str, ...]]] = {
    op: (tuple((start, until) for start, until in entry["since_versions"]), tuple(t.upper() for t in entry["types"]))
    for op, entry in _REGISTRY["single_op_kernels"].items()
    if entry["domain"] in ("", "ai.onnx") and not op.startswith("Memcpy")
}
MODES = ("graph", "single_op")

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


def since_version(node: ir.Node, opset: int) -> int | None:
    """The schema since-version a default-domain node resolves to at the model's opset (None: unknown op)."""
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain or "").since_version
    except onnx.defs.SchemaError:
        return None


def kernel_matches(ranges, version: int) -> bool:
    return any(version == start if until is None else start <= version <= until for start, until in ranges)


def _all_initializers(node: ir.Node) -> bool:
    inputs = [v for v in node.inputs if v is not None]
    return bool(inputs) and all(v.is_initializer() or v.const_value is not None for v in inputs)


def graph_reason(node: ir.Node, opset: int) -> str | None:
    """Why graph mode with enable_cann_subgraph=1 leaves this node on the CPU, or None when the NPU takes it."""
    if node.domain not in ("", "ai.onnx"):
        return f"{node.domain} op"
    if node.op_type not in GRAPH_WHITELIST:
        return "not on the graph-mode whitelist"
    if opset < GRAPH_MIN_OPSET:
        return f"opset {opset} < {GRAPH_MIN_OPSET}"
    if _all_initializers(node):
        return "every input is an initializer"
    return None


def single_op_reason(node: ir.Node, opset: int) -> str | None:
    """Why single-op mode (enable_cann_graph=0) has no NPU kernel for this node, or None when it has one."""
    if node.domain not in ("", "ai.onnx"):
        return f"{node.domain} op"
    entry = SINGLE_OP_KERNELS.get(node.op_type)
    if entry is None:
        return "no CANN kernel"
    ranges, dtypes = entry
    version = since_version(node, opset)
    if version is None or not kernel_matches(ranges, version):
        return f"no kernel for since-version {version} (registered {_ranges_text(ranges)})"
    value = node.inputs[0] if node.inputs else None
    if dtypes is not None and value is not None and value.dtype is not None and value.dtype.name not in dtypes:
        return f"no {value.dtype.name} kernel"
    return None


def _ranges_text(ranges) -> str:
    return ", ".join(f"[{a}, {b}]" if b is not None else f"={a}" for a, b in ranges)


def placement(model: ir.Model, mode: str) -> dict:
    """Predicted placement under the ORT CANN EP: nodes on the NPU, contiguous NPU partitions in topological
    order, CPU fallbacks with reasons, and host<->device copies of run-time tensors (initializers are copied once)."""
    opset = model.opset_imports.get("", 1)
    judge = graph_reason if mode == "graph" else single_op_reason
    device: dict[ir.Node, str] = {}
    reasons: Counter = Counter()
    cpu_ops: Counter = Counter()
    partitions, previous = 0, "cpu"
    for node in model.graph:
        reason = judge(node, opset)
        device[node] = "cpu" if reason else "npu"
        if reason:
            reasons[reason] += 1
            cpu_ops[op_key(node)] += 1
        elif previous == "cpu":
            partitions += 1
        previous = device[node]
    npu = sum(1 for d in device.values() if d == "npu")
    return {
        "mode": mode,
        "kernel_table": f"onnxruntime-cann {REGISTRY_VERSION} (read from the wheel)",
        "provider_options": {"enable_cann_graph": "1", "enable_cann_subgraph": "1"} if mode == "graph"
        else {"enable_cann_graph": "0"},
        "opset": opset,
        "nodes": len(device),
        "npu_nodes": npu,
        "cpu_nodes": len(device) - npu,
        "npu_partitions": partitions,
        "cpu_ops": dict(sorted(cpu_ops.items())),
        "cpu_reasons": dict(sorted(reasons.items())),
        **_transfers(model.graph, device),
    }


def _transfers(graph: ir.Graph, device: dict[ir.Node, str]) -> dict[str, int]:
    """Run-time tensors crossing host<->device, with the bytes of those whose shape is static (a dequantized
    weight is; an activation with a symbolic sequence length is counted without bytes)."""
    counts = {"host_to_device_tensors": 0, "device_to_host_tensors": 0,
              "host_to_device_static_bytes": 0, "device_to_host_static_bytes": 0}
    graph_outputs = set(graph.outputs)
    for value in list(graph.inputs) + [out for node in graph for out in node.outputs]:
        if value.is_initializer():
            continue
        producer = value.producer()
        where = device.get(producer, "cpu") if producer is not None else "cpu"
        readers = {device[user] for user, _ in value.uses() if user in device}
        if value in graph_outputs:
            readers.add("cpu")
        direction = "host_to_device" if where == "cpu" and "npu" in readers else \
            "device_to_host" if where == "npu" and "cpu" in readers else None
        if direction:
            counts[f"{direction}_tensors"] += 1
            counts[f"{direction}_static_bytes"] += _static_bytes(value)
    return counts


def _static_bytes(value: ir.Value) -> int:
    shape, dtype = value.shape, value.dtype
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0].is_initializer():
        # A dequantized weight: the integer tensor's shape, the scale's float type (QDQ insertion sets no shapes).
        shape, dtype = producer.inputs[0].const_value.shape, producer.inputs[1].dtype
    if shape is None or dtype is None or not all(isinstance(d, int) for d in shape):
        return 0
    return int(math.prod(shape) * dtype.itemsize)


def offending_nodes(model: ir.Model) -> list[str]:
    """Nodes outside the graph-mode whitelist, other than Q/DQ (which the EP leaves on the host by design)."""
    opset = model.opset_imports.get("", 1)
    found = []
    for node in model.graph:
        reason = graph_reason(node, opset)
        if reason and reason != "every input is an initializer" and node.op_type not in QDQ_OPS:
            op = op_key(node)
            found.append(f"{node.name or '?'} ({op}: {reason})")
    return found


@dataclass(frozen=True)
class CannBackend(Backend):
    """The CANN EP takes only whitelisted standard ops: fusions run only where they produce one (MatMul + bias ->
    Gemm); everything else is decomposed into primitives after QDQ insertion."""

    def adapt_recipe(self, recipe: Recipe) -> tuple[Recipe, list[str], dict[str, str]]:
        """The recipe unchanged, with what the CANN EP really computes for it (../shared/docs/cann-ep.md)."""
        recipe, notes, entries = super().adapt_recipe(recipe)
        if not recipe.op_types:
            return recipe, notes, entries
        notes = [*notes, f"{recipe.name} on {self.name}: QuantizeLinear / DequantizeLinear have no CANN kernel and are "
                 "not on the graph-mode whitelist, so ORT runs them on the host CPU and the NPU multiplies the "
                 "dequantized float weights (precision_mode must_keep_origin_dtype): the file carries the recipe's "
                 "integer grids, the NPU computes in float. Ascend's integer matmuls are reached through AMCT/ATC "
                 "(Q/DQ -> AscendQuant / AscendDequant / AscendAntiQuant), which takes per-tensor activations and "
                 "per-channel weights only"
                 + (", not the blocks of this recipe" if recipe.weight.granularity == "block" else "")]
        return recipe, notes, entries

    def measuring_backend(self) -> Backend:
        # Calibration and float comparisons need the float graph computed exactly; they run on ORT CPU whether or
        # not an NPU is present (NPU-vs-CPU agreement is `qtc parity`'s job, with its precision mode recorded).

        return CPU

    def placement(self, model: ir.Model) -> dict:
        return {mode: placement(model, mode) for mode in MODES}


CANN = CannBackend(
    name="cann",
    provider="CANNExecutionProvider",
    provider_options=cann_options({"precision_mode": "must_keep_origin_dtype"}),
    recipes_native=(),
    whitelist_only=True,
)
