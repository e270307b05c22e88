"""Canonicalization: one clean, sorted, shape-annotated graph at the recipe's opset before anything else runs."""

from __future__ import annotations

import logging

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import _constant_folding
from onnxscript.version_converter import ConvertVersionPass

from qtc.errors import QtcError
from qtc.frontends.onnx_file import external_tensors
from qtc.passes.meta import warn

log = logging.getLogger(__name__)


class InferShapesPass(ir.passes.InPlacePass):
    """Shape inference that never stops the pipeline: LLM graphs often defeat it (ORT #10484, Olive #1093).

    Shapes only sharpen later decisions (per-channel axes come from initializers, not inferred shapes), so a
    failure is recorded in `model.meta["qtc.warnings"]` and the graph goes on unchanged.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            result = common.ShapeInferencePass(strict_mode=False)(model)
        except Exception as exc:  # onnx's C++ inference raises many types; none of them is fatal to us
            warn(model, f"shape inference skipped: {str(exc).splitlines()[0]}")
            return ir.passes.PassResult(model, modified=False)
        _restore_sequence_types(model.graph)
        return result


# Ops whose outputs are sequences: onnx_ir's shape-inference pass records them as plain tensors of their element
# type, which ONNX Runtime then rejects ("Type (tensor(float)) ... does not match expected type (seq(tensor))").
_SEQUENCE_OUTPUTS = {"SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceConstruct", "SplitToSequence"}


def _restore_sequence_types(graph: ir.Graph) -> None:
    for node in graph.all_nodes():
        if node.op_type in _SEQUENCE_OUTPUTS and node.domain in ("", "ai.onnx"):
            for value in node.outputs:
                if isinstance(value.type, ir.TensorType):
                    value.type = ir.SequenceType(value.type)
                    value.shape = None


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Bring the default-domain opset up to the recipe's (QDQ is emitted at opset 21); never downgrade."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", 1)
        if current >= self.target:
            return ir.passes.PassResult(model, modified=False)
        if current < ATTRIBUTE_ERA and not external_tensors(model) and _convert_with_onnx(model, self.target):
            return ir.passes.PassResult(model, modified=True)
        try:
            ConvertVersionPass(target_version=self.target, fallback=False)(model)
        except Exception as exc:
            raise QtcError(f"cannot convert the model from opset {current} to {self.target}: {exc}") from None
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 1) < self.target:
            raise ir.passes.PostconditionError(f"default opset is still below {self.target}")


# Below opset 18 operators still take attributes that later became inputs (Pad pads, Clip min/max, Split split,
# Unsqueeze/Squeeze axes, ReduceMean/ReduceSum axes), Gemm/Add carry `broadcast` and BatchNormalization `is_test`:
# onnx's own C++ converter has an adapter for each; onnxscript's converter bumps versions and leaves the
# attributes, and ONNX Runtime then rejects the graph.
ATTRIBUTE_ERA = 18


def _convert_with_onnx(model: ir.Model, target: int) -> bool:
    """Convert in place with onnx.version_converter (weights in memory: models without external data only);
    False when it cannot, so the onnxscript converter gets its turn."""
    proto = ir.to_proto(model)
    listed = {i.name for i in proto.graph.input}
    # The converter reads the old IR convention (every initializer also a graph input): list them, then unlist.
    proto.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in proto.graph.initializer if t.name not in listed)
    try:
        converted = ir.from_proto(onnx.version_converter.convert_version(proto, target))
    except Exception:  # noqa: BLE001 - the C++ converter raises RuntimeError / ConvertError / ValidationError
        return False
    common.RemoveInitializersFromInputsPass()(converted)
    _drop_legacy_attributes(converted.graph)
    if model.opset_imports.get("", 1) < 7:
        _per_channel_slopes(converted.graph)
    model.graph = converted.graph
    model.ir_version = max(model.ir_version, converted.ir_version)
    return True


def _drop_legacy_attributes(graph: ir.Graph) -> None:
    """Attributes the converter leaves that later opsets removed: BatchNormalization `is_test` (inference is the
    only mode since opset 7) and `spatial` (per-channel, the only form since opset 9), Gemm's `broadcast` (always
    on since opset 7), `consumed_inputs` anywhere."""
    for node in graph.all_nodes():
        node.attributes.pop("consumed_inputs", None)
        if node.op_type == "Gemm" and node.domain in ("", "ai.onnx"):
            node.attributes.pop("broadcast", None)
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            node.attributes.pop("is_test", None)
            spatial = node.attributes.pop("spatial", None)
            if spatial is not None and spatial.as_int() != 1:
                raise QtcError(f"BatchNormalization {node.name or ''} with spatial=0 has no form in opset >= 9")


def _per_channel_slopes(graph: ir.Graph) -> None:
    """PRelu before opset 7 applied a slope of C values per channel (axis 1); from opset 7 on the slope broadcasts
    numpy-style, from the last axis, and the converter keeps the [C] slope: on [N, C, ...] inputs that is another
    computation, or none (ORT: shapes do not broadcast). The slope becomes [C, 1, ..., 1], what it always meant."""
    for node in graph.all_nodes():
        if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, slope = node.inputs[0], node.inputs[1]
        rank = x.shape.rank() if x is not None and x.shape is not None else None
        if slope is None or slope.const_value is None or rank is None or rank < 3:
            continue
        values = slope.const_value.numpy()
        if values.ndim == 1 and values.size > 1:
            reshaped = values.reshape(values.size, *([1] * (rank - 2)))
            slope.const_value = ir.tensor(reshaped, name=slope.name)
            slope.shape = ir.Shape(reshaped.shape)


class CheckOperatorsPass(ir.passes.InPlacePass):
    """Refuse, naming them, what no inference runtime compiles: training ops and domains without schemas."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        training = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes() if n.domain.startswith(TRAINING)})
        if training:
            raise QtcError(f"training operators cannot be compiled for inference: {', '.join(training)}")
        unknown = sorted({n.domain for n in model.graph.all_nodes() if n.domain not in KNOWN_DOMAINS
                          and not any(f.domain == n.domain for f in model.functions.values())})
        if unknown:
            raise QtcError(f"operators of unknown domains (no schemas, no ORT kernels qtc knows): {', '.join(unknown)}")
        return ir.passes.PassResult(model, modified=False)


TRAINING = "ai.onnx.preview.training"
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "pkg.onnxscript.torch_lib",
                 "pkg.onnxscript.torch_lib.common")


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
        CheckOperatorsPass(),
        common.RemoveInitializersFromInputsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
        UpgradeOpsetPass(opset),
        FoldConstantsPass(),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedOpsetsPass(),
        common.TopologicalSortPass(),
        InferShapesPass(),
    ]
