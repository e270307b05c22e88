"""Torch -> ONNX export helpers shared by every exporter: quiet dynamo export, weight-transpose folding, the
optimizer pipeline qtc uses, and run-independent metadata (so the same weights export to the same bytes)."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript
import onnxscript.optimizer
import onnxscript.rewriter

from qtc.util.cache import sha256_file

# Node metadata the exporter writes that depends on where/how the export ran; dropped.
_DROP_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


_DROP_GRAPH_METADATA = ("pkg.torch.export.ExportedProgram.range_constraints",)


def exporter_versions() -> dict[str, str]:
    """The export stack's versions: part of every export cache key."""
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxscript": onnxscript.__version__,
        "onnx_ir": onnx_ir.__version__,
    }


@contextlib.contextmanager
def quiet():
    """Silence the exporter's progress prints, warnings and log lines (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fold_weight_transposes(model, param_names: set[str]) -> int:
    """Replace `Transpose(perm=[1,0])` of a parameter initializer with the transposed initializer, same name."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        perm = node.attributes.get("perm")
        if (
            src is None
            or src.name not in param_names
            or src.const_value is None
            or len(src.shape or ()) != 2
            or perm is None
            or tuple(perm.as_ints()) != (1, 0)
            or len(src.uses()) != 1
            or src.name not in graph.initializers
        ):
            continue
        name = src.name
        array = np.ascontiguousarray(src.const_value.numpy().T)
        out = node.outputs[0]
        graph.initializers.pop(name)
        new = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(src.dtype),
                       const_value=ir.tensor(array, name=name))
        graph.register_initializer(new)
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        folded += 1
    return folded


def optimize_exported(model) -> None:
    """onnxscript's `optimize_ir` pipeline without `DeduplicateInitializersPass` (keeps one tensor per norm)."""
    common.InlinePass()(model)
    for _ in range(2):
        onnxscript.optimizer.fold_constants_ir(model, onnx_shape_inference=True)
        onnxscript.rewriter.rewrite(model)
        common.RemoveUnusedNodesPass()(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def normalize_metadata(model) -> None:
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        for key in _DROP_NODE_METADATA:
            node.metadata_props.pop(key, None)
    for key in _DROP_GRAPH_METADATA:
        model.graph.metadata_props.pop(key, None)
    for value in model.graph.initializers.values():
        for key in list(value.metadata_props):
            if key.startswith("pkg.onnxscript.optimizer"):
                value.metadata_props.pop(key)


def export_ids_mask_model(module, path: Path, *, vocab_size: int, max_seq: int | None = None) -> dict:
    """Dynamo-export a torch module taking (input_ids, attention_mask) -> logits, with dynamic batch and sequence,
    weight transposes folded and the graph optimized; saved to `path` (+ `path.name + '.data'`)."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(4, vocab_size, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=max_seq) if max_seq else torch.export.Dim("seq")
    t0 = time.perf_counter()
    with quiet(), torch.no_grad():
        program = torch.onnx.export(
            module,
            (ids, mask),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            dynamo=True,
            optimize=False,
            verbose=False,
        )
        onnx_model = program.model
        folded = fold_weight_transposes(onnx_model, {name for name, _ in module.named_parameters()})
        optimize_exported(onnx_model)
    normalize_metadata(onnx_model)
    graph = onnx_model.graph
    if [v.name for v in graph.inputs] != ["input_ids", "attention_mask"] or [v.name for v in graph.outputs] != ["logits"]:
        raise RuntimeError(f"unexpected graph signature: {[v.name for v in graph.inputs]} -> {[v.name for v in graph.outputs]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(onnx_model, path, external_data=path.name + ".data")
    return {
        "export_s": round(time.perf_counter() - t0, 2),
        "opset": onnx_model.opset_imports.get("", None),
        "folded_weight_transposes": folded,
    }


def export_hashes(onnx_path: Path) -> dict[str, str]:
    """sha256 of an exported model and of its external data file (`<name>.data` beside it), for build records."""
    return {"model_sha256": sha256_file(onnx_path), "data_sha256": sha256_file(onnx_path.with_name(onnx_path.name + ".data"))}
