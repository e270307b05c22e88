"""Target-aware operator fusion: the float graph each runtime runs fastest, before quantization is decided.

Each `Fusion` is a set of onnxscript rewrite rules (pattern / check / rewrite; `check` says why a match failed)
and declares, per target, the op its fused form becomes there. A fusion with no op for a target never runs for
it: the `cann` EP takes only standard whitelisted ops (../shared/docs/cann-ep.md), so nothing fuses for `cann`
and `passes/legalize.py` decomposes instead.

Fusions keep every weight MatMul standalone (attention fuses after the Q/K/V projections, never into ORT's
packed-QKV `Attention`), so the quantization annotator still finds each projection, and QDQ lands on the
MatMuls ORT's CPU EP turns into integer GEMMs.

Most rules are onnxscript's own (`onnxscript.rewriter.ort_fusions`, written for torch-dynamo exports of
transformers models); qtc adds SiLU, picks and orders them, and declares where each is legal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.ort_fusions import (
    bias_gelu,
    cos_sin_cache,
    erfgelu,
    gelu,
    rms_normalization,
    rotary_embedding,
    sdpa,
    sdpa_via_mha,
    skip_normalization,
)
from onnxscript.rewriter.rules.common import _matmul_add_to_gemm
from onnxscript.rewriter.rules.fusion import _layer_norm, _rotary_embedding

from qtc.core.ops import MS_DOMAIN, op_key
from qtc.passes.canonicalize import FoldConstantsPass, InferShapesPass
from qtc.passes.gqa_fusion import gqa_rules, normed_qkv_rules, normed_rotary_rules, qkv_rules
from qtc.passes.meta import FUSION_COUNTS

# onnxscript's fusions go through intermediate ops in this domain (SDPA, a RotaryEmbedding function) that a
# later rule consumes; what is left of them is inlined back into standard ops at the end.
_INTERMEDIATE_DOMAIN = "ai.onnxruntime._fusion"
_ORT = ("cpu", "cuda")  # targets that run ORT's com.microsoft contrib kernels
# ONNX-standard fused ops (RotaryEmbedding, Attention with grouped K/V heads) exist from opset 23; ORT 1.32's
# CPU EP implements them. A model canonicalized at this opset (recipe `opset: 23`) gets them on cpu.
STANDARD_OPSET = 23


class SiluFusion(pattern.RewriteRuleClassBase):
    """x * Sigmoid(x) -> com.microsoft QuickGelu(alpha=1), which computes x * sigmoid(alpha * x) in one pass."""

    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def check(self, context, x, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return result.fail(f"QuickGelu takes float / float16, not {x.dtype}", x)
        return result

    def rewrite(self, op, x, **_):
        return op.QuickGelu(x, alpha=1.0, _domain=MS_DOMAIN)


class SkipRmsNormKeepingShapes(skip_normalization.SkipRmsNormFusion):
    """onnxscript's residual Add + RMSNorm rule with two differences, each of which kept half of a pre-norm
    decoder's residuals as Add + SimplifiedLayerNormalization (qwen2.5-coder-0.5b: 24 of 48):
    - its check wants input and skip to share symbolic [B, S, D] names, but shape inference names the sequence
      axis of an attention output afresh (`unk__7` beside `sequence_length`); here rank 3 and equal hidden sizes
      are what must agree (the Add itself already requires the rest to broadcast);
    - the fused node's outputs keep the shapes of the values they replace, so the next residual reading the sum
      is still recognised."""

    def check(self, op, input, skip, gamma, bias, simplified_layer_norm, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        shapes = [v.shape for v in (input, skip)]
        if any(shape is None or shape.rank() != 3 for shape in shapes):
            return result.fail("input or skip is not known to be [batch, sequence, hidden]", [input, skip])
        hidden = shapes[0][2]
        if not isinstance(hidden, int) or shapes[1][2] != hidden:
            return result.fail(f"hidden sizes differ or are unknown: {shapes[0]} vs {shapes[1]}", [input, skip])
        for vector in (gamma, bias) if self._has_bias else (gamma,):
            if vector.shape is None or list(vector.shape) != [hidden]:
                return result.fail(f"{vector.name} is not a [{hidden}] vector", vector)
        if simplified_layer_norm.producer().attributes.get_int("stash_type", 1) != 1:
            return result.fail("stash_type other than float32 is not supported by the fused kernel")
        return result

    def rewrite(self, op, input, skip, gamma, bias, simplified_layer_norm, skip_sum, **rest):
        normalized, total = super().rewrite(op, input, skip, gamma, bias, simplified_layer_norm, **rest)
        for new, old in ((normalized, simplified_layer_norm), (total, skip_sum)):
            new.shape, new.type = old.shape, old.type
        return normalized, total


_SKIP_RMS_RULES = pattern.RewriteRuleSet([
    SkipRmsNormKeepingShapes.rule("SkipRmsNormPreBias", has_bias=True, bias_pre_add=True),
    SkipRmsNormKeepingShapes.rule("SkipRmsNormBias", has_bias=True, bias_pre_add=False),
    SkipRmsNormKeepingShapes.rule("SkipRmsNorm", has_bias=False),
])


class CosSinCacheByMulFusion(cos_sin_cache.CosSinCacheFusion):
    """onnxscript's cos/sin cache fusion, with the run-time table computed by a broadcast Mul instead of a MatMul
    against the constant inverse frequencies: the quantization policy would take that MatMul for a weighted
    layer and put the rotary angles on an int8 grid."""

    def _compute_dynamic_freqs(self, op, inv_freq, position_ids, dtype):
        if self._max_pos_id is not None or position_ids.const_value is not None:
            return super()._compute_dynamic_freqs(op, inv_freq, position_ids, dtype)
        count = op.Add(op.ReduceMax(position_ids, keepdims=0), op.Constant(value_int=1))
        positions = op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1))
        positions = op.Cast(op.Reshape(positions, op.Constant(value_ints=[-1, 1])), to=ir.DataType.FLOAT)
        angles = op.Mul(positions, op.Reshape(inv_freq, op.Constant(value_ints=[1, -1])))
        return op.Cos(angles), op.Sin(angles)


class BroadcastCosSinCacheFusion(CosSinCacheByMulFusion):
    """Rotary cos/sin tables as torch dynamo exports transformers' rotary embedding for positions shared by the
    batch ([S] or [1, S]) or given per row ([batch, S], a KV decoder's input), freqs = Cast(Unsqueeze(positions)) * inv_freq (a broadcast Mul; onnxscript's rules expect MatMul + Transpose),
    -> com.microsoft RotaryEmbedding over tables indexed by position (built from the constant inverse frequencies
    at run time, so no maximum length is baked in)."""

    def __init__(self):
        super().__init__("CosSinCache_broadcast")

    def pattern(self, op, x, inv_freq, position_ids, interleaved, num_heads, extra_dims):
        positions = op.Cast(op.Unsqueeze(position_ids, extra_dims), to=ir.DataType.FLOAT)
        freqs = op.Mul(positions, inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos_4d = op.Unsqueeze(op.Cos(emb), [1])
        sin_4d = op.Unsqueeze(op.Sin(emb), [1])
        return op.RotaryEmbedding(x, cos_4d, sin_4d, interleaved=interleaved, num_heads=num_heads,
                                  _domain=_INTERMEDIATE_DOMAIN)

    def check(self, context, inv_freq, position_ids, extra_dims, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if _ir_utils.has_rank(position_ids, 1):  # a Range [S], unsqueezed to [1, S, 1]
            wanted = [0, 2]
        elif _ir_utils.has_rank(position_ids, 2):  # [1, S] (Gemma 3) or [batch, S] (KV decoders), to [., S, 1]
            wanted = [2]
        else:
            return result.fail("positions are neither [S] nor [batch, S]", position_ids)
        if not _ir_utils.is_1d_value(extra_dims, wanted):
            return result.fail(f"positions are not unsqueezed along {wanted}", extra_dims)
        if inv_freq.const_value is None or inv_freq.const_value.shape.rank() != 1:
            return result.fail("inverse frequencies are not a constant vector", inv_freq)
        return result

    def rewrite(self, op, x, inv_freq, position_ids, interleaved, num_heads, **_):
        if inv_freq not in self._inv_freq_cos_sin_cache:  # one table pair per frequency set, shared by all layers
            self._inv_freq_cos_sin_cache[inv_freq] = self._compute_dynamic_freqs(op, inv_freq, position_ids, None)
        cos, sin = self._inv_freq_cos_sin_cache[inv_freq]
        rows = op.Unsqueeze(position_ids, op.Constant(value_ints=[0])) if position_ids.shape.rank() == 1 else position_ids
        if position_ids.shape.rank() == 2 and position_ids.shape[0] != 1:
            return op.RotaryEmbedding(x, rows, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain=MS_DOMAIN)
        # The positions are shared by the batch, but RotaryEmbedding wants one row of them per sequence.
        batch = op.Concat(op.Shape(x, start=0, end=1), op.Constant(value_ints=[1]), axis=0)
        return op.RotaryEmbedding(x, op.Expand(rows, batch), cos, sin, interleaved=interleaved, num_heads=num_heads,
                                  _domain=MS_DOMAIN)


def _sdpa_scale(sdpa_output: ir.Value) -> dict:
    scale = sdpa_output.producer().attributes.get("scale")
    return {} if scale is None else {"scale": scale.as_float()}


class GroupedSdpaToAttention(pattern.RewriteRuleClassBase):
    """SDPA over K/V expanded from fewer heads -> ONNX Attention (opset 23) on the unexpanded K/V: the standard
    op takes query and key/value head counts from the 4-D shapes, so the Expand/Reshape copies disappear."""

    def pattern(self, op, query, key, value, mask, key_groups, key_shape, value_groups, value_shape):
        key_4d = op.Reshape(op.Expand(op.Unsqueeze(key, [2]), key_groups), key_shape)
        value_4d = op.Reshape(op.Expand(op.Unsqueeze(value, [2]), value_groups), value_shape)
        return op.SDPA(query, key_4d, value_4d, mask, key_format="BHSd", _domain=_INTERMEDIATE_DOMAIN,
                       _outputs=["sdpa_output"])

    def check(self, context, query, key, value, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for name, v in (("query", query), ("key", key), ("value", value)):
            if not _ir_utils.has_rank(v, 4):
                return result.fail(f"{name} is not a 4-D [batch, heads, seq, head_size] tensor", v)
        heads, kv_heads = query.shape[1], key.shape[1]
        if not (isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads and heads % kv_heads == 0):
            return result.fail(f"query heads {heads} are not a known multiple of K/V heads {kv_heads}", key)
        return result

    def rewrite(self, op, query, key, value, mask, sdpa_output, **_):
        return op.Attention(query, key, value, mask, **_sdpa_scale(sdpa_output))


class SdpaToAttention(pattern.RewriteRuleClassBase):
    """SDPA with as many K/V heads as query heads -> ONNX Attention (opset 23); a key in [B, S, H, d] (BERT-style
    exports) is transposed to [B, H, S, d] first."""

    def pattern(self, op, query, key, value, key_format):
        return op.SDPA(query, key, value, key_format=key_format, _allow_other_inputs=True,
                       _domain=_INTERMEDIATE_DOMAIN, _outputs=["sdpa_output"])

    def check(self, context, query, key, key_format, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if key_format.value not in ("BHSd", "BSHd"):
            return result.fail(f"unknown key format {key_format.value}", key)
        if not (_ir_utils.has_rank(query, 4) and _ir_utils.has_rank(key, 4)):
            return result.fail("query or key is not a 4-D tensor", query)
        return result

    def rewrite(self, op, query, key, value, key_format, sdpa_output, **_):
        if key_format.value == "BSHd":
            key = op.Transpose(key, perm=[0, 2, 1, 3])
        mask = sdpa_output.producer().inputs[3:4]
        return op.Attention(query, key, value, *mask, **_sdpa_scale(sdpa_output))


@dataclass(frozen=True)
class Form:
    """A fusion's other form: on these targets, in models at `min_opset` or newer, these rules produce `op`."""

    targets: tuple[str, ...]
    min_opset: int
    rules: pattern.RewriteRuleSet
    op: str


@dataclass(frozen=True)
class Fusion:
    """A family of rewrite rules and the op its fused form is on each target where it is legal."""

    name: str
    rules: pattern.RewriteRuleSet
    produces: dict[str, str]  # target -> "domain::Op" of the fused form
    note: str = ""
    infer_shapes: bool = False  # later rules read shapes of the nodes this one creates
    after: tuple[str, ...] = field(default=())  # fusions whose output this one consumes
    forms: tuple[Form, ...] = ()  # checked first, in order (highest min_opset first)

    def _form(self, target: str, opset: int) -> Form | None:
        return next((f for f in self.forms if target in f.targets and opset >= f.min_opset), None)

    def op_for(self, target: str, opset: int) -> str | None:
        form = self._form(target, opset)
        return form.op if form else self.produces.get(target)

    def rules_for(self, target: str, opset: int) -> pattern.RewriteRuleSet:
        form = self._form(target, opset)
        return form.rules if form else self.rules


def _rules(*rules) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(list(rules), commute=False)


def _each(targets: tuple[str, ...], op: str) -> dict[str, str]:
    return {t: op for t in targets}


# Order is the design: norms before their residual forms, erf/tanh GELU before the bias form, the rotary pair
# (x*cos + rotate_half(x)*sin, then its cos/sin cache) before attention, SDPA before its MHA implementation.
FUSIONS: tuple[Fusion, ...] = (
    Fusion("rms_norm", rms_normalization.rms_normalization_ruleset, _each(_ORT, "SimplifiedLayerNormalization"),
           "x * rsqrt(mean(x^2) + eps) * w (Gemma's (1 + w) is folded into w by canonicalization)"),
    Fusion("layer_norm", _layer_norm.layer_normalization_ruleset, _each(_ORT, "LayerNormalization"),
           "decomposed mean/variance normalization -> ONNX LayerNormalization (opset 17)"),
    Fusion("skip_rms_norm", _SKIP_RMS_RULES,
           _each(_ORT, f"{MS_DOMAIN}::SkipSimplifiedLayerNormalization"), "residual Add + RMSNorm", after=("rms_norm",)),
    Fusion("skip_layer_norm", skip_normalization.skip_layer_normalization_ruleset,
           _each(_ORT, f"{MS_DOMAIN}::SkipLayerNormalization"), "residual Add (+ bias) + LayerNorm",
           after=("layer_norm",)),
    Fusion("gelu_erf", erfgelu.rules, _each(_ORT, f"{MS_DOMAIN}::Gelu"), "0.5 x (1 + erf(x / sqrt 2))"),
    Fusion("gelu_tanh", gelu.gelu_rules, _each(_ORT, f"{MS_DOMAIN}::FastGelu"), "0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))"),
    Fusion("bias_gelu", bias_gelu.bias_gelu_rules, _each(_ORT, f"{MS_DOMAIN}::BiasGelu"),
           "Add(bias) + Gelu: the MatMul before it stays standalone", after=("gelu_erf",)),
    Fusion("silu", _rules(SiluFusion.rule()), _each(_ORT, f"{MS_DOMAIN}::QuickGelu"),
           "x * sigmoid(x) (the SwiGLU gate's activation; gate and up MatMuls stay standalone)"),
    Fusion("rotary", rotary_embedding.rotary_embedding_rules, {},
           "x cos + rotate_half(x) sin: an intermediate function, kept only when its cos/sin cache fuses too",
           forms=(Form(("cpu",), STANDARD_OPSET, _rotary_embedding.rotary_embedding_rules, "RotaryEmbedding"),)),
    Fusion("rotary_cache", _rules(
        CosSinCacheByMulFusion.rule("CosSinCache_cast", cast=True, const_freqs=False),
        CosSinCacheByMulFusion.rule("CosSinCache_cast_const_freqs", cast=True, const_freqs=True),
        CosSinCacheByMulFusion.rule("CosSinCache_const_freqs", cast=False, const_freqs=True),
        CosSinCacheByMulFusion.rule("CosSinCache", cast=False),
        BroadcastCosSinCacheFusion.rule()),
           _each(_ORT, f"{MS_DOMAIN}::RotaryEmbedding"), "position-indexed cos/sin tables from constant inverse frequencies",
           after=("rotary",)),
    Fusion("gqa", gqa_rules, {"cpu": f"{MS_DOMAIN}::GroupQueryAttention"},
           "cached attention (past/present Concat, grouped K/V expansion, causal mask from attention_mask) -> "
           "GroupQueryAttention, which takes each row's length from attention_mask (padding only at a row's end, "
           "as onnxruntime-genai feeds it); the Q/K/V projections stay MatMuls", infer_shapes=True),
    Fusion("qkv_pack", qkv_rules, {"cpu": f"{MS_DOMAIN}::GroupQueryAttention"},
           "the Q/K/V projections of a GroupQueryAttention packed into one MatMul (one MatMulNBits per layer once "
           "quantized), Q and K rotated inside the attention (do_rotary with the model's position_ids)",
           after=("gqa",)),
    Fusion("gqa_normed_rotary", normed_rotary_rules, {"cpu": f"{MS_DOMAIN}::GroupQueryAttention"},
           "per-head Q/K norms (Gemma 3) on the [batch, seq, heads, head_size] view, Q and K rotated inside the "
           "attention (do_rotary with the model's position_ids): no head transposes", after=("gqa",)),
    Fusion("qkv_pack_normed", normed_qkv_rules, {"cpu": f"{MS_DOMAIN}::GroupQueryAttention"},
           "the Q/K/V projections of such an attention packed into one MatMul and a Split before the per-head "
           "norms (one MatMulNBits per layer once quantized)", after=("gqa_normed_rotary",)),
    Fusion("sdpa", sdpa.sdpa_rules, {}, "softmax(Q K^T * scale + mask) V, with GQA's K/V head expansion",
           infer_shapes=True),
    # ORT 1.32's CPU MultiHeadAttention lost to the unfused MatMul/Softmax/MatMul on every reference model
    # (ORT profiles, kernel ms per prefill: minilm-l6 128 tokens 42.0 vs 37.2; zh-tiny-lm 256: 26.7 vs 22.9;
    # gemma-3-270m 256: MHA 44 vs 30 for the unfused attention ops), so cpu gets no MHA. At opset 23 cpu gets
    # the standard Attention, which takes grouped K/V heads without the expanded copies (gemma: 33 ms).
    Fusion("attention", sdpa_via_mha._rules, {"cuda": f"{MS_DOMAIN}::MultiHeadAttention"},
           "SDPA -> MultiHeadAttention after the Q/K/V projections (which stay MatMuls for quantization); at "
           "opset 23 on cpu, ONNX Attention over the unexpanded K/V heads",
           after=("sdpa",),
           forms=(Form(("cpu",), STANDARD_OPSET, _rules(GroupedSdpaToAttention.rule(), SdpaToAttention.rule()),
                       "Attention"),)),
    Fusion("matmul_bias", _rules(_matmul_add_to_gemm.matmul_add_to_gemm_rule),
           {"cpu": "Gemm", "cuda": "Gemm", "cann": "Gemm"}, "2-D MatMul + bias Add -> Gemm (whitelisted on cann)"),
)
# Intermediate steps run for a target whenever the fusion that consumes them is legal there.
_BY_NAME = {f.name: f for f in FUSIONS}
# Fusions layer skipping leaves out: those that swallow a block's residual Add (it gates exactly those Adds' branch
# inputs), and gqa: GroupQueryAttention also writes the present KV, so a gate could skip only the o projection of
# its branch (q/k/v would feed the cache write); layer-skipped decoders keep the decomposed attention.
RESIDUAL_FUSIONS = ("skip_rms_norm", "skip_layer_norm", "gqa", "qkv_pack")
_CONSUMERS = {f.name: [g for g in FUSIONS if f.name in g.after] for f in FUSIONS}


def _runs_on(fusion: Fusion, target: str, opset: int) -> bool:
    return any(f.op_for(target, opset) for f in (fusion, *_CONSUMERS[fusion.name]))


def model_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", 0)


class FuseOperatorsPass(ir.passes.InPlacePass):
    """Apply every fusion legal on `target`, in order; `model.meta["qtc.fusions"]` gets, per fusion, the rule
    applications and the fused op's count in the final graph (an intermediate a later rule did not take is
    inlined back, so applications can exceed what survives)."""

    def __init__(self, target: str, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.target = target
        self.exclude = set(exclude)
        # A subset of fusion names (per-rule numerical checks), with the intermediate steps they consume.
        self.only = None if only is None else set(only) | {d for name in only for d in _BY_NAME[name].after}

    def _wants(self, name: str) -> bool:
        return (self.only is None or name in self.only) and name not in self.exclude

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        applied: dict[str, int] = {}
        opset = model_opset(model)
        if self._wants("rms_norm") and _runs_on(_BY_NAME["rms_norm"], self.target, opset):
            _spell_out_reduce_mean_defaults(model)
        for fusion in FUSIONS:
            if (self.only is not None and fusion.name not in self.only) or fusion.name in self.exclude:
                continue
            if not _runs_on(fusion, self.target, opset):
                continue
            applied[fusion.name] = fusion.rules_for(self.target, opset).apply_to_model(model)
            if applied[fusion.name]:
                # what a rule bypassed (gqa leaves the 4-D rotary form unread) still reads values a later rule
                # must own alone (qkv_pack's projections)
                common.RemoveUnusedNodesPass()(model)
            if fusion.infer_shapes and applied[fusion.name]:
                InferShapesPass()(model)
        modified = any(applied.values())
        if modified:
            _inline_intermediates(model)
        ops = Counter(op_key(n) for n in model.graph)
        produced = {f.name: f.op_for(self.target, opset) for f in FUSIONS}
        model.meta[FUSION_COUNTS] = {
            "target": self.target,
            "opset": opset,
            "fusions": {
                f.name: {"op": produced[f.name], "applied": applied.get(f.name, 0),
                         "in_graph": ops.get(produced[f.name], 0) if applied.get(f.name) else 0}
                for f in FUSIONS if produced[f.name] and (self.only is None or f.name in self.only)
            },
        }
        return ir.passes.PassResult(model, modified=modified)

    def ensures(self, model: ir.Model) -> None:
        left = sorted({n.op_type for n in model.graph if n.domain == _INTERMEDIATE_DOMAIN})
        if left:
            raise ir.passes.PostconditionError(f"intermediate fusion ops left in the graph: {', '.join(left)}")


def _spell_out_reduce_mean_defaults(model: ir.Model) -> None:
    """Write `noop_with_empty_axes=0` on ReduceMean nodes that leave it to its default: onnxscript's RMSNorm
    pattern names the attribute, so a graph that omits it (qtc's own KV exports, hand-written ONNX) never fused
    (qwen2.5-coder-0.5b decoder: 0 of 49 norms). The attribute only matters when axes are empty, so it is only
    written where the axes are a non-empty constant."""
    for node in model.graph:
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or "noop_with_empty_axes" in node.attributes:
            continue
        axes = node.inputs[1] if len(node.inputs) > 1 else None
        if axes is not None and axes.const_value is not None and axes.const_value.numpy().size:
            node.attributes["noop_with_empty_axes"] = ir.AttrInt64("noop_with_empty_axes", 0)


def _inline_intermediates(model: ir.Model) -> None:
    common.InlinePass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedOpsetsPass()(model)
    # Rewrites leave small Constant nodes (reshape targets, axes): fold and lift them like canonicalization does.
    FoldConstantsPass()(model)
    common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model)
    common.RemoveUnusedNodesPass()(model)
    common.TopologicalSortPass()(model)
    InferShapesPass()(model)


def fusion_counts(model: ir.Model) -> dict:
    return model.meta.get(FUSION_COUNTS, {})
