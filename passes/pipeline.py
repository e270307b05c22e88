"""The compile pipeline, top to bottom. Each step is a pass; the order is the design."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from qtc.backends import compile_target
from qtc.backends.base import max_ir_version
from qtc.calibration.data import CalibrationSet
from qtc.errors import QtcError
from qtc.passes.annotate import AnnotateQuantizationPass
from qtc.passes.calibrate import (
    CalibrateActivationsPass,
    CalibrationCache,
    CollectLayerStatisticsPass,
)
from qtc.passes.canonicalize import canonicalize_passes
from qtc.passes.embedding_tables import FuseQuantizedTablesPass
from qtc.passes.finalize import LimitIrVersionPass, RecordProvenancePass
from qtc.passes.fusion import RESIDUAL_FUSIONS, FuseOperatorsPass
from qtc.passes.layerskip import (
    DiscoverBranchesPass,
    InsertLayerSkipPass,
    LayerSkipSpec,
    ScoreBranchesPass,
)
from qtc.passes.legalize import legalization_passes
from qtc.passes.matmulnbits import WriteMatMulNBitsPass
from qtc.passes.qdq import InsertQDQPass
from qtc.passes.rotate import RotateResidualPass
from qtc.passes.rounding import EagerGptq, RoundWeightsPass
from qtc.passes.smooth import SmoothActivationsPass
from qtc.passes.weightonly import ExpandInt8WeightsPass
from qtc.recipes import QuantSpec, Recipe


def build_pipeline(
    recipe: Recipe,
    target: str,
    calib: CalibrationSet | None = None,
    provenance: dict[str, str] | None = None,
    quiet: bool = False,
    allow_fallback: bool = False,
    layer_skip: LayerSkipSpec | None = None,
    keep_residual_adds: bool = False,
    cache: CalibrationCache | None = None,
    accuracy_level: int | None = None,
    segment_bytes: int | None = None,
) -> ir.passes.PassManager:
    backend = compile_target(target)
    measure = backend.measuring_backend()
    if sequential_gptq(recipe) and (cache is not None or recipe.smooth is not None):
        raise QtcError(f"recipe '{recipe.name}': sequential GPTQ runs the graph segment by segment and rounds as it "
                       "goes; it cannot be combined with smoothing or --max-drop yet")
    if sequential_gptq(recipe) and segment_bytes is None:
        raise ValueError("sequential GPTQ needs segment_bytes (qtc.compile sets about one layer's weights)")
    return ir.passes.PassManager(
        [
            # 1. One canonical graph: constants lifted and folded, dead code gone, sorted, at the QDQ opset.
            *canonicalize_passes(recipe.opset),
            #     A recipe's residual rotation, on the decomposed norms and before anything measures activations.
            *([RotateResidualPass()] if recipe.rotate else []),
            # 1b. The float graph the target runs fastest (contrib ops for cpu/cuda; nothing for cann). Weight
            #     MatMuls stay standalone, so the policy below still sees every projection. Layer skipping
            #     needs the residual Adds it gates left unfused.
            FuseOperatorsPass(backend.name, exclude=(RESIDUAL_FUSIONS if keep_residual_adds or layer_skip is not None
                                                     else ()) + _unpackable(recipe)),
            # 2. Policy: which nodes the recipe quantizes, and how (no graph change).
            AnnotateQuantizationPass(recipe),
            # 3. Outliers and rounding from streamed layer statistics (X^T X, channel max): SmoothQuant moves
            #    activation outliers into weights; GPTQ / AWQ choose the integers. Float semantics unchanged.
            #    `cache`: what an earlier compile of this model on this data measured (--max-drop's attempts).
            #    `segment_bytes`: run the float graph a slice of weights at a time (models larger than memory).
            #    Segmented (big models): GPTQ rounds each group as soon as its statistics finish, so no Gram
            #    outlives its segment (smoothing and AWQ change weights later segments read: they wait).
            #    Sequential GPTQ (a recipe's `sequential: true`): segmented, each segment re-run with its rounding.
            CollectLayerStatisticsPass(calib, measure, recipe.smooth, quiet=quiet, cache=cache, segment_bytes=segment_bytes,
                                       eager=EagerGptq() if segment_bytes is not None and cache is None
                                       and recipe.smooth is None else None, sequential=sequential_gptq(recipe),
                                       ranges=not sequential_gptq(recipe)),
            *([SmoothActivationsPass(recipe.smooth)] if recipe.smooth else []),
            RoundWeightsPass(),
            # 4. Activation ranges on the flat (possibly smoothed) float graph, on the target's runtime, streaming;
            #    min/max ranges the statistics pass already kept per channel are derived (rescaled), not re-run.
            CalibrateActivationsPass(calib, measure, quiet=quiet, cache=cache, segment_bytes=segment_bytes),
            # 5. Materialization: integer weights + DequantizeLinear, QuantizeLinear/DequantizeLinear pairs.
            InsertQDQPass(backend.unsigned_activations, backend.unsigned_weights),
            # 5b. Target kernels the runtime does not fuse itself: quantized embedding tables (and tied heads).
            *([FuseQuantizedTablesPass(accuracy_level)] if backend.block_table_kernels else []),
            #     Block-int4 weight MatMuls as MatMulNBits with the recipe's accuracy level in the node (a server
            #     reads no qtc session config; ORT's own fusion would default to int8 activations).
            *([WriteMatMulNBitsPass(accuracy_level)] if backend.block_table_kernels and accuracy_level is not None else []),
            #     Weight-only int8 weights the runtime would dequantize on every call: expanded once at load.
            *([ExpandInt8WeightsPass()] if backend.expand_int8_weights else []),
            # 6. Budget gates (only when asked): branches scored and gated on the quantized flat graph, since
            #    calibration and QDQ insertion see only the top-level graph, not If branches.
            *(_layer_skip_passes(layer_skip, calib, measure, quiet) if layer_skip else []),
            # 7. Legalization: what the target cannot take becomes primitives it can (cann); Q/DQ stay. After the
            #    gates, so a gated model's If nodes are judged (and refused on cann unless --allow-fallback) too.
            *(legalization_passes(allow_fallback) if backend.whitelist_only else []),
            # 8. Cleanup and what the runtime needs to load the result; provenance last.
            common.RemoveUnusedNodesPass(),
            common.TopologicalSortPass(),
            LimitIrVersionPass(max_ir_version()),
            RecordProvenancePass(provenance or {}),
        ]
    )


def build_analysis_pipeline(recipe: Recipe, target: str, calib: CalibrationSet, quiet: bool = False,
                            cache: CalibrationCache | None = None) -> ir.passes.PassManager:
    """The compile pipeline up to calibration, collecting every layer's statistics; nothing is materialized.
    `qtc.measure.sensitivity.layer_sensitivity` then reads the result."""
    backend = compile_target(target)
    measure = backend.measuring_backend()
    return ir.passes.PassManager(
        [
            *canonicalize_passes(recipe.opset),
            *([RotateResidualPass()] if recipe.rotate else []),
            FuseOperatorsPass(backend.name, exclude=_unpackable(recipe)),
            AnnotateQuantizationPass(recipe),
            CollectLayerStatisticsPass(calib, measure, recipe.smooth, quiet=quiet, every_layer=True, cache=cache,
                                       ranges=True),
            *([SmoothActivationsPass(recipe.smooth)] if recipe.smooth else []),
            CalibrateActivationsPass(calib, measure, quiet=quiet, cache=cache),
        ]
    )


def _layer_skip_passes(spec: LayerSkipSpec, calib: CalibrationSet | None, backend, quiet: bool) -> list:
    return [
        common.RemoveUnusedNodesPass(),  # dead float weights' producers would otherwise look like branch parts
        DiscoverBranchesPass(),
        ScoreBranchesPass(spec, calib, backend, quiet=quiet),
        InsertLayerSkipPass(),
    ]


def sequential_gptq(recipe: Recipe) -> bool:
    """Whether some layer's GPTQ takes its statistics from the quantized layers before it."""
    return any(spec.sequential for spec in weight_specs(recipe))


def weight_specs(recipe: Recipe) -> list[QuantSpec]:
    return [recipe.weight] + [rule.weight for rule in recipe.rules if isinstance(rule.weight, QuantSpec)]


def _unpackable(recipe: Recipe) -> tuple[str, ...]:
    """The Q/K/V packing fusions where packing Q/K/V into one MatMul would change what the recipe says: an override that names
    a q/k/v projection (it would no longer match a layer of its own), or per-tensor weights (one scale for the
    three would replace three)."""
    named = any(rule.selector in ("name", "node") and any(p in rule.pattern for p in ("q_proj", "k_proj", "v_proj"))
                for rule in recipe.rules)
    specs = weight_specs(recipe)
    return ("qkv_pack", "qkv_pack_normed") if named or any(spec.granularity == "tensor" for spec in specs) else ()
