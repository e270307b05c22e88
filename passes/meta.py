"""Every key passes write into `model.meta` / `node.meta` (the in-memory notes one pass hands the next), typed
accessors for them, and `report_sections`: the one place that turns them into compile-report sections.

`model.meta` never reaches the file: what a reader of the saved model needs goes to metadata_props instead
(`RecordProvenancePass`, the layer-skip plan)."""

from __future__ import annotations

import json

import onnx_ir as ir

# node.meta: the recipe's decision for a node (annotate.QuantAnnotation), why it is kept float, tied head
ANNOTATION = "qtc.quant"
ROLE = "qtc.role"
TIED = "qtc.tied"  # the node reads the embedding table (a tied LM head)

# model.meta, in pipeline order
WARNINGS = "qtc.warnings"  # list[str]: things the user should know that did not stop the compile
ROTATION = "qtc.rotation"  # rotate.RotateResidualPass: what was rotated
FUSION_COUNTS = "qtc.fusions"  # fusion.FuseOperatorsPass: per fusion, the op produced and how often
ANNOTATED = "qtc.annotated"  # int: nodes the recipe quantizes
LAYER_STATS = "qtc.layer_stats"  # calibrate: per weight layer, streamed X^T X / channel maxima
SMOOTHING = "qtc.smoothing"  # smooth: per smoothed activation, alpha and scale summary
ROUNDING = "qtc.rounding"  # rounding: GPTQ / AWQ record per layer
GRAM_DIR = "qtc.gram_dir"  # calibrate: scratch folder of offloaded Gram matrices (segmented runs), deleted with the model
SEGMENTED = "qtc.segmented"  # calibrate: the graph ran a slice at a time (passes/segments.py)
RANGES = "qtc.ranges"  # calibrate: activation key -> (min, max)
OBSERVERS = "qtc.observers"  # calibrate: activation key -> observer summary
FUSED_TABLES = "qtc.fused_tables"  # embedding_tables: packed tables written
WRITTEN_MATMULNBITS = "qtc.matmulnbits"  # matmulnbits: block-int4 MatMuls written as MatMulNBits, and the level
EXPANDED = "qtc.expanded_int8_weights"  # weightonly: int8 weights expanded at load
BRANCHES = "qtc.branches"  # layerskip: residual branches (core.blocks.Branch)
SKIP_PLAN = "qtc.layer_skip"  # layerskip: tables, scores, range re-check
LEGALIZATION = "qtc.legalization"  # legalize: decompositions and CPU-fallback nodes (cann)


def warn(model: ir.Model, *messages: str) -> None:
    model.meta.setdefault(WARNINGS, []).extend(messages)


def smoothing_of(model: ir.Model, name: str) -> dict | None:
    return model.meta.get(SMOOTHING, {}).get(name)


def quantized_counts(model: ir.Model) -> dict:
    """Quantized nodes by op type and the roles of nodes kept float, subgraphs included (--layer-skip moves the
    quantized MatMuls into If branches)."""
    by_op: dict[str, int] = {}
    kept = {}
    for node in model.graph.all_nodes():
        if ANNOTATION in node.meta:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + 1
        elif ROLE in node.meta:
            kept[node.name] = node.meta[ROLE]
    return {"quantized_nodes_by_op": dict(sorted(by_op.items())), "kept_float_roles": dict(sorted(kept.items()))}


def activation_ranges(model: ir.Model) -> dict:
    return {json.dumps(list(key)): value for key, value in model.meta.get(OBSERVERS, {}).items()}


def report_sections(model: ir.Model) -> dict:
    """What the passes recorded, as compile-report sections (plain data)."""
    sections = {
        "activation_ranges": activation_ranges(model),
        "smoothing": model.meta.get(SMOOTHING),
        "rounding": model.meta.get(ROUNDING),
        "fusions": model.meta.get(FUSION_COUNTS, {}),
        "legalization": model.meta.get(LEGALIZATION),
        "matmulnbits": model.meta.get(WRITTEN_MATMULNBITS),
        "warnings": model.meta.get(WARNINGS, []),
    }
    if SKIP_PLAN in model.meta:
        sections["layer_skip"] = model.meta[SKIP_PLAN]
    if SEGMENTED in model.meta:
        sections["segmented_calibration"] = model.meta[SEGMENTED]
    if ROTATION in model.meta:
        sections["rotation"] = model.meta[ROTATION]
    return sections
