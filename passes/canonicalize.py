"""Canonicalization: one clean, sorted, shape-annotated graph at the recipe's opset before anything else runs."""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import _constant_folding
from onnxscript.version_converter import ConvertVersionPass

from qtc.errors import QtcError
from qtc.passes.meta import warn

log = logging.getLogger(__name__)


class InferShapesPass(ir.passes.InPlacePass):
    """Shape inference that never stops the pipeline: LLM graphs often defeat it (ORT #10484, Olive #1093).

    Shapes only sharpen later decisions (per-channel axes come from initializers, not inferred shapes), so a
    failure is recorded in `model.meta["qtc.warnings"]` and the graph goes on unchanged.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            return common.ShapeInferencePass(strict_mode=False)(model)
        except Exception as exc:  # onnx's C++ inference raises many types; none of them is fatal to us
            warn(model, f"shape inference skipped: {str(exc).splitlines()[0]}")
            return ir.passes.PassResult(model, modified=False)


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Bring the default-domain opset up to the recipe's (QDQ is emitted at opset 21); never downgrade."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", 1)
        if current >= self.target:
            return ir.passes.PassResult(model, modified=False)
        try:
            ConvertVersionPass(target_version=self.target, fallback=False)(model)
        except Exception as exc:
            raise QtcError(f"cannot convert the model from opset {current} to {self.target}: {exc}") from None
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 1) < self.target:
            raise ir.passes.PostconditionError(f"default opset is still below {self.target}")


def _fold_small_only(node: ir.Node) -> bool | None:
    # Returning None defers to the folder's size limits, which keep big weight transposes (a tied embedding
    # would be duplicated) out of folding; the annotator quantizes through such a Transpose instead.
    return None


class FoldConstantsPass(ir.passes.InPlacePass):
    """Constant folding of what only initializers and constants feed, within size limits."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = _constant_folding.fold_constants(model, should_fold=_fold_small_only)
        return ir.passes.PassResult(model, modified=result.modified)


def canonicalize_passes(opset: int) -> list[ir.passes.PassBase]:
    """The canonicalization sequence, in order."""
    return [
        common.RemoveInitializersFromInputsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
        UpgradeOpsetPass(opset),
        FoldConstantsPass(),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedOpsetsPass(),
        common.TopologicalSortPass(),
        InferShapesPass(),
    ]
