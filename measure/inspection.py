"""`qtc inspect`: what a model holds, float or compiled."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import onnx_ir as ir

from qtc.backends import get_backend
from qtc.core.blocks import find_branches, summary
from qtc.core.ops import MS_DOMAIN, op_key
from qtc.frontends.onnx_file import all_initializers, external_tensors, load_model

_LAYER_INDEX = re.compile(r"^(?P<prefix>.*?)[./_](?P<index>\d+)[./_]")


# Kernels that read packed integer blocks themselves (uint8 bytes holding `bits`-bit values): which input.
PACKED_INPUT = {"MatMulNBits": 1, "GatherBlockQuantized": 0}


def quantized_fraction(model: ir.Model) -> dict:
    """Weights (initializers of rank >= 2, also inside If branches) stored as integers behind a DequantizeLinear (or
    the Cast of an expanded int8 weight) or packed for a block kernel (counted in weights, not bytes), by element
    count."""
    # DequantizeLinear inputs, and the 8-bit weights passes/weightonly.py hands to a Cast (expanded at load)
    dq_inputs = {n.inputs[0].name for n in model.graph.all_nodes() if n.inputs and n.inputs[0] is not None
                 and (n.op_type == "DequantizeLinear"
                      or n.op_type == "Cast" and n.inputs[0].dtype in (ir.DataType.INT8, ir.DataType.UINT8))}
    packed = {n.inputs[PACKED_INPUT[n.op_type]].name: n.attributes.get_int("bits", 4)
              for n in model.graph.all_nodes() if n.op_type in PACKED_INPUT and n.domain == MS_DOMAIN}
    quantized = floating = 0
    for value in all_initializers(model):
        tensor = value.const_value
        if tensor is None or tensor.shape.rank() < 2:
            continue
        if value.name in dq_inputs:
            quantized += tensor.size
        elif value.name in packed:
            quantized += tensor.size * 8 // packed[value.name]
        elif tensor.dtype.is_floating_point():
            floating += tensor.size
    total = quantized + floating
    return {"quantized_elements": quantized, "float_elements": floating,
            "fraction": quantized / total if total else 0.0}


def repeated_blocks(model: ir.Model) -> list[dict]:
    """Repeated blocks named like `layers.3.` in initializer names: prefix, count, parameters per block."""
    blocks: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for value in all_initializers(model):
        match = _LAYER_INDEX.match(value.name or "")
        if match and value.const_value is not None:
            blocks[match["prefix"]][int(match["index"])] += value.const_value.size
    found = []
    for prefix, members in sorted(blocks.items()):
        if len(members) >= 2:
            sizes = sorted(set(members.values()))
            found.append({"prefix": prefix, "count": len(members), "params_per_block": sizes[-1]})
    return found


def residual_branches(model: ir.Model) -> dict:
    """Blocks and their attention / MLP residual branches (found by structure), and any budget gates."""
    found = summary(find_branches(model.graph))
    found["gates"] = sum(1 for node in model.graph if node.op_type == "If" and (node.name or "").startswith("qtc_gate_"))
    return found


def inspect_model(path: str | Path, target: str | None = None) -> dict:
    """What the model holds; with a target that splits graphs (cann), where each node is predicted to run."""
    path = Path(path)
    model = load_model(path)
    backend = get_backend(target) if target else None
    externals = defaultdict(int)
    for tensor in external_tensors(model):
        externals[tensor.location] += tensor.nbytes
    return {
        "file": path.name,
        "ir_version": model.ir_version,
        "opsets": dict(sorted(model.opset_imports.items())),
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "inputs": [_describe(v) for v in model.graph.inputs],
        "outputs": [_describe(v) for v in model.graph.outputs],
        **graph_summary(model),
        "external_data": dict(sorted(externals.items())),
        "weights_quantized": quantized_fraction(model),
        "repeated_blocks": repeated_blocks(model),
        "residual_branches": residual_branches(model),
        "qtc_metadata": {k: v for k, v in sorted(model.metadata_props.items()) if k.startswith("qtc.")},
        **({"target": target, "placement": backend.placement(model)} if backend is not None else {}),
    }


def _describe(value: ir.Value) -> dict:
    dims = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else None
    return {"name": value.name, "dtype": value.dtype.name if value.dtype else None, "shape": dims}


def graph_summary(model: ir.Model) -> dict:
    """Op histogram and tensor bytes by dtype: the same numbers `qtc inspect` shows."""
    ops = Counter(op_key(n) for n in model.graph.all_nodes())
    by_dtype: Counter = Counter()
    params: Counter = Counter()
    for value in all_initializers(model):
        tensor = value.const_value
        if tensor is not None:
            by_dtype[tensor.dtype.name] += tensor.nbytes
            params[tensor.dtype.name] += tensor.size
    return {
        "ops": dict(sorted(ops.items())),
        "bytes_by_dtype": dict(sorted(by_dtype.items())),
        "params_by_dtype": dict(sorted(params.items())),
        "tensor_bytes": sum(by_dtype.values()),
    }
