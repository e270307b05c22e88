"""What each fusion does to a model's outputs: applications, fused ops left, and the output difference it costs."""

from __future__ import annotations

import onnx_ir as ir

from qtc.backends.compare import compare_models
from qtc.backends.cpu import CPU
from qtc.passes.fusion import FUSIONS, FuseOperatorsPass, fusion_counts, model_opset


def measure_fusions(model: ir.Model, target: str, feeds: list[dict]) -> dict:
    """Per fusion legal on `target`: applications, fused ops left, and the max |output difference| of the model
    with only that fusion (and the steps it consumes) against the unfused model, on ORT CPU over `feeds`.
    `model` is the canonicalized float model; its graph is not changed (its weights are loaded into memory)."""
    ir.external_data.load_to_model(model)  # in memory, so that copies need no base folder
    results = {}
    for fusion in FUSIONS:
        if not fusion.op_for(target, model_opset(model)):
            continue
        candidate = ir.from_proto(ir.to_proto(model))
        FuseOperatorsPass(target, only=(fusion.name,))(candidate)
        entry = dict(fusion_counts(candidate)["fusions"][fusion.name])
        if entry["applied"]:
            outputs = compare_models(CPU, model, candidate, feeds)["outputs"]
            entry["max_abs_diff"] = max(o["max_abs_diff"] for o in outputs.values())
        results[fusion.name] = entry
    return results
