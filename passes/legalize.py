"""Legalization for the `cann` target: every op outside the CANN graph-mode whitelist becomes whitelisted
primitives, and what only initializers feed is folded (the EP refuses nodes whose inputs are all initializers).

Facts: ../shared/docs/cann-ep.md. Q/DQ stay as they are (the EP runs them on the host; Huawei's AMCT route
converts them). Decompositions are onnxscript rewrite rules on one op each; `check` says why an instance cannot
be decomposed (e.g. a normalization over several axes), and such a node is then reported as offending.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter import pattern

from qtc.backends.cann import QDQ_OPS, offending_nodes
from qtc.core.ops import MS_DOMAIN, op_key
from qtc.errors import QtcError
from qtc.passes.meta import LEGALIZATION, warn

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


def _float_input(x: ir.Value) -> pattern.MatchResult:
    result = pattern.MatchResult()
    if x.dtype is not None and x.dtype not in _FLOATS:
        return result.fail(f"input is {x.dtype}, not floating point", x)
    return result


def _last_axis(node: ir.Node, x: ir.Value) -> pattern.MatchResult:
    result = pattern.MatchResult()
    axis = node.attributes.get_int("axis", -1)
    rank = x.shape.rank() if x.shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        return result.fail(f"normalizes from axis {axis}, not only the last axis", x)
    if len([o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1:
        return result.fail("its mean / inverse-std outputs are used", node)
    return _float_input(x)


def _scalar(op, value: float, like: ir.Value):
    # A scalar of the input's own float type (CastLike is not on the whitelist).
    dtype = like.dtype if like.dtype in _FLOATS else ir.DataType.FLOAT
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype.numpy())))


def _rms(op, x, epsilon: float):
    axes = op.Constant(value_ints=[-1])
    mean_square = op.ReduceMean(op.Mul(x, x), axes, keepdims=1)
    return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean_square, _scalar(op, epsilon, x)))))


def _layer_norm(op, x, scale, bias, epsilon: float):
    axes = op.Constant(value_ints=[-1])
    centered = op.Sub(x, op.ReduceMean(x, axes, keepdims=1))
    variance = op.ReduceMean(op.Mul(centered, centered), axes, keepdims=1)
    normed = op.Mul(op.Div(centered, op.Sqrt(op.Add(variance, _scalar(op, epsilon, x)))), scale)
    return op.Add(normed, bias) if bias is not None else normed


def _erf_gelu(op, x):
    inner = op.Erf(op.Mul(x, _scalar(op, 1 / math.sqrt(2), x)))
    return op.Mul(op.Mul(x, _scalar(op, 0.5, x)), op.Add(inner, _scalar(op, 1.0, x)))


def _tanh_gelu(op, x):
    cube = op.Mul(op.Mul(x, x), x)
    inner = op.Mul(op.Add(x, op.Mul(cube, _scalar(op, 0.044715, x))), _scalar(op, math.sqrt(2 / math.pi), x))
    return op.Mul(op.Mul(x, _scalar(op, 0.5, x)), op.Add(op.Tanh(inner), _scalar(op, 1.0, x)))


class DecomposeLayerNorm(pattern.RewriteRuleClassBase):
    """LayerNormalization(x, scale[, bias]) over the last axis -> ReduceMean / Sub / Mul / Sqrt / Div / Mul / Add."""

    def pattern(self, op, x, scale):
        return op.LayerNormalization(x, scale, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, x, y, **_):
        return _last_axis(y.producer(), x)

    def rewrite(self, op, x, scale, y, **_):
        node = y.producer()
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return _layer_norm(op, x, scale, bias, node.attributes.get_float("epsilon", 1e-5))


class _DecomposeRms(pattern.RewriteRuleClassBase):
    """RMS normalization over the last axis -> Mul / ReduceMean / Add / Sqrt / Reciprocal / Mul."""

    op_type, domain = "", ""

    def pattern(self, op, x, scale):
        return getattr(op, self.op_type)(x, scale, _domain=self.domain, _outputs=["y"])

    def check(self, context, x, y, **_):
        return _last_axis(y.producer(), x)

    def rewrite(self, op, x, scale, y, **_):
        return op.Mul(_rms(op, x, y.producer().attributes.get_float("epsilon", 1e-5)), scale)


class DecomposeRmsNormalization(_DecomposeRms):
    op_type = "RMSNormalization"  # ONNX opset 23


class DecomposeSimplifiedLayerNormalization(_DecomposeRms):
    op_type = "SimplifiedLayerNormalization"  # ORT's contrib op in the ONNX domain


class _DecomposeSkipNorm(pattern.RewriteRuleClassBase):
    """com.microsoft Skip(Simplified)LayerNormalization(x, skip, gamma, ...) -> the residual Add (+ bias) and the
    norm in primitives; the sum output (the residual stream the next block reads) is that Add."""

    op_type = ""

    def pattern(self, op, x, skip):
        return getattr(op, self.op_type)(x, skip, _domain=MS_DOMAIN, _allow_other_inputs=True,
                                         _outputs=["y", "mean", "inv_std", "sum"])

    def check(self, context, x, y, mean=None, inv_std=None, **_):
        result = _float_input(x)  # exporters leave unused outputs out (GenAI builder): then they are None here
        if result and any(v is not None and (v.uses() or v.is_graph_output()) for v in (mean, inv_std)):
            return result.fail("its mean / inverse-std outputs are used", y.producer())
        return result

    def rewrite(self, op, x, skip, y, **_):
        node = y.producer()
        total = op.Add(x, skip)
        bias = self.bias(node)
        if bias is not None:
            total = op.Add(total, bias)
        normed = self.norm(op, total, node, node.attributes.get_float("epsilon", 1e-5))
        return normed, normed, normed, total  # mean / inv_std are unused (checked)

    @staticmethod
    def _input(node: ir.Node, index: int) -> ir.Value | None:
        return node.inputs[index] if len(node.inputs) > index else None


class DecomposeSkipSimplifiedLayerNorm(_DecomposeSkipNorm):
    op_type = "SkipSimplifiedLayerNormalization"  # inputs: x, skip, gamma[, bias]

    def bias(self, node):
        return self._input(node, 3)

    def norm(self, op, total, node, epsilon):
        return op.Mul(_rms(op, total, epsilon), node.inputs[2])


class DecomposeSkipLayerNorm(_DecomposeSkipNorm):
    op_type = "SkipLayerNormalization"  # inputs: x, skip, gamma[, beta[, bias]]

    def bias(self, node):
        return self._input(node, 4)

    def norm(self, op, total, node, epsilon):
        return _layer_norm(op, total, node.inputs[2], self._input(node, 3), epsilon)


def _rank4(result: pattern.MatchResult, **values: ir.Value) -> pattern.MatchResult:
    for name, value in values.items():
        if result and (value.shape is None or value.shape.rank() != 4):
            result.fail(f"{name} is not a 4-D [batch, heads, seq, head_size] tensor", value)
    return result


class DecomposeAttention(pattern.RewriteRuleClassBase):
    """ONNX Attention (opset 23) on 4-D Q/K/V, without a KV cache or causal flag -> MatMul / Softmax / MatMul;
    grouped K/V heads are repeated (Expand + Reshape) to the query's head count."""

    def pattern(self, op, query, key, value):
        return op.Attention(query, key, value, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, query, key, value, y, **_):
        node = y.producer()
        result = _rank4(_float_input(query), query=query, key=key, value=value)
        if result and (len(node.inputs) > 4 or len(node.outputs) > 1):
            return result.fail("it reads or writes a KV cache", node)
        if result and (node.attributes.get_int("is_causal", 0) or node.attributes.get_float("softcap", 0.0)):
            return result.fail("is_causal / softcap are not decomposed", node)
        heads, kv_heads = query.shape[1], key.shape[1]
        if result and not (isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads == 0):
            return result.fail(f"query heads {heads} are not a known multiple of K/V heads {kv_heads}", key)
        return result

    def rewrite(self, op, query, key, value, y, **_):
        node = y.producer()
        heads, kv_heads, head_size = query.shape[1], key.shape[1], query.shape[3]
        if heads != kv_heads:
            key, value = (self._repeat(op, t, heads // kv_heads, heads) for t in (key, value))
        scale = node.attributes.get_float("scale", 1.0 / math.sqrt(head_size))
        return _attend(op, query, key, value, node.inputs[3] if len(node.inputs) > 3 else None, scale)

    @staticmethod
    def _repeat(op, x, group: int, heads: int):
        grouped = op.Expand(op.Unsqueeze(x, op.Constant(value_ints=[2])), op.Constant(value_ints=[1, 1, group, 1, 1]))
        return op.Reshape(grouped, op.Constant(value_ints=[0, heads, -1, x.shape[3]]))


def _attend(op, query, key, value, mask, scale: float):
    """softmax(Q K^T * scale + mask) V on [batch, heads, seq, d] tensors; a boolean mask is True where attended."""
    scores = op.Mul(op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2])), _scalar(op, scale, query))
    if mask is not None:
        if mask.dtype == ir.DataType.BOOL:
            mask = op.Where(mask, _scalar(op, 0.0, query), _scalar(op, -np.inf, query))
        scores = op.Add(scores, mask)
    return op.MatMul(op.Softmax(scores, axis=-1), value)


class DecomposeMultiHeadAttention(pattern.RewriteRuleClassBase):
    """com.microsoft MultiHeadAttention on 3-D [batch, seq, heads * d] Q/K/V with at most an additive attention
    bias (as qtc's cuda fusion writes it) -> per-head Reshape / Transpose around the same MatMul / Softmax / MatMul."""

    def pattern(self, op, query, key, value):
        return op.MultiHeadAttention(query, key, value, _domain=MS_DOMAIN, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, query, key, value, y, **_):
        node = y.producer()
        result = _float_input(query)
        for name, v in (("query", query), ("key", key), ("value", value)):
            if result and (v.shape is None or v.shape.rank() != 3 or not isinstance(v.shape[2], int)):
                result.fail(f"{name} is not a 3-D [batch, seq, hidden] tensor with a static hidden size", v)
        extra = [i for i, v in enumerate(node.inputs[3:], start=3) if v is not None and i != 5]
        if result and (extra or len(node.outputs) > 1):
            return result.fail("bias, key padding mask or KV cache inputs/outputs are not decomposed", node)
        return result

    def rewrite(self, op, query, key, value, y, **_):
        node = y.producer()
        heads = node.attributes.get_int("num_heads")
        head_size = query.shape[2] // heads
        split = op.Constant(value_ints=[0, 0, heads, -1])
        q, k, v = (op.Transpose(op.Reshape(t, split), perm=[0, 2, 1, 3]) for t in (query, key, value))
        bias = node.inputs[5] if len(node.inputs) > 5 else None
        scale = node.attributes.get_float("scale", 0.0) or 1.0 / math.sqrt(head_size)
        out = _attend(op, q, k, v, bias, scale)
        return op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


class DecomposeRotaryEmbedding(pattern.RewriteRuleClassBase):
    """ONNX RotaryEmbedding (opset 23), 4-D input, rotate-half (not interleaved), full head -> Slice / Mul / Sub /
    Add / Concat, with the cos/sin rows gathered by position when position ids are given."""

    def pattern(self, op, x, cos, sin):
        return op.RotaryEmbedding(x, cos, sin, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, x, y, **_):
        node = y.producer()
        result = _rank4(_float_input(x), x=x)
        if result and node.attributes.get_int("interleaved", 0):
            return result.fail("interleaved rotation is not decomposed", node)
        if result and node.attributes.get_int("rotary_embedding_dim", 0) not in (0, x.shape[3]):
            return result.fail("partial rotation is not decomposed", node)
        if result and not isinstance(x.shape[3], int):
            return result.fail("the head size is not static", x)
        return result

    def rewrite(self, op, x, cos, sin, y, **_):
        node = y.producer()
        return _rotate_half(op, x, cos, sin, node.inputs[3] if len(node.inputs) > 3 else None)


class DecomposeMsRotaryEmbedding(DecomposeRotaryEmbedding):
    """com.microsoft RotaryEmbedding(x, position_ids, cos_cache, sin_cache) on a 4-D input, the same way."""

    def pattern(self, op, x, positions, cos, sin):
        return op.RotaryEmbedding(x, positions, cos, sin, _domain=MS_DOMAIN, _outputs=["y"])

    def check(self, context, x, y, **_):
        result = super().check(context, x, y)
        if result and y.producer().attributes.get_float("scale", 1.0) != 1.0:
            return result.fail("a scaled rotation is not decomposed", x)
        return result

    def rewrite(self, op, x, positions, cos, sin, **_):
        return _rotate_half(op, x, cos, sin, positions)


def _rotate_half(op, x, cos, sin, positions):
    """x [batch, heads, seq, d] rotated by cos/sin [batch, seq, d/2] (or [max_position, d/2] rows at positions)."""
    if positions is not None:
        cos, sin = op.Gather(cos, positions, axis=0), op.Gather(sin, positions, axis=0)
    axis_heads = op.Constant(value_ints=[1])
    cos, sin = op.Unsqueeze(cos, axis_heads), op.Unsqueeze(sin, axis_heads)  # [batch, 1, seq, d/2]
    half = x.shape[3] // 2
    last = op.Constant(value_ints=[-1])
    first = op.Slice(x, op.Constant(value_ints=[0]), op.Constant(value_ints=[half]), last)
    second = op.Slice(x, op.Constant(value_ints=[half]), op.Constant(value_ints=[2 * half]), last)
    return op.Concat(op.Sub(op.Mul(first, cos), op.Mul(second, sin)),
                     op.Add(op.Mul(second, cos), op.Mul(first, sin)), axis=-1)


class DecomposeGelu(pattern.RewriteRuleClassBase):
    """ONNX Gelu (opset 20), exact or tanh-approximated -> Erf or Tanh with Mul / Add."""

    def pattern(self, op, x):
        return op.Gelu(x, _outputs=["y"])

    def check(self, context, x, y, **_):
        result = _float_input(x)
        approximate = y.producer().attributes.get_string("approximate", "none")
        if result and approximate not in ("none", "tanh"):
            return result.fail(f"unknown approximate={approximate!r}", x)
        return result

    def rewrite(self, op, x, y, **_):
        tanh = y.producer().attributes.get_string("approximate", "none") == "tanh"
        return _tanh_gelu(op, x) if tanh else _erf_gelu(op, x)


class DecomposeMsGelu(pattern.RewriteRuleClassBase):
    """com.microsoft Gelu -> the erf form."""

    def pattern(self, op, x):
        return op.Gelu(x, _domain=MS_DOMAIN)

    def check(self, context, x, **_):
        return _float_input(x)

    def rewrite(self, op, x, **_):
        return _erf_gelu(op, x)


class DecomposeBiasGelu(pattern.RewriteRuleClassBase):
    """com.microsoft BiasGelu(x, bias) -> the erf form of x + bias."""

    def pattern(self, op, x, bias):
        return op.BiasGelu(x, bias, _domain=MS_DOMAIN)

    def check(self, context, x, **_):
        return _float_input(x)

    def rewrite(self, op, x, bias, **_):
        return _erf_gelu(op, op.Add(x, bias))


class DecomposeFastGelu(pattern.RewriteRuleClassBase):
    """com.microsoft FastGelu(x[, bias]) -> the tanh form."""

    def pattern(self, op, x):
        return op.FastGelu(x, _domain=MS_DOMAIN, _allow_other_inputs=True, _outputs=["y"])

    def check(self, context, x, **_):
        return _float_input(x)

    def rewrite(self, op, x, y, **_):
        node = y.producer()
        bias = node.inputs[1] if len(node.inputs) > 1 else None
        return _tanh_gelu(op, op.Add(x, bias) if bias is not None else x)


class DecomposeQuickGelu(pattern.RewriteRuleClassBase):
    """com.microsoft QuickGelu(x, alpha) -> x * Sigmoid(alpha * x) (SiLU when alpha is 1)."""

    def pattern(self, op, x):
        return op.QuickGelu(x, _domain=MS_DOMAIN, _outputs=["y"])

    def check(self, context, x, **_):
        return _float_input(x)

    def rewrite(self, op, x, y, **_):
        alpha = y.producer().attributes.get_float("alpha", 1.702)
        scaled = x if alpha == 1.0 else op.Mul(x, _scalar(op, alpha, x))
        return op.Mul(x, op.Sigmoid(scaled))


class DecomposeIsNaN(pattern.RewriteRuleClassBase):
    """IsNaN(x) -> Not(Equal(x, x)): NaN is the one value unequal to itself. IsNaN is not on the CANN graph-mode
    list, Equal and Not are; default transformers exports (sdpa attention) put IsNaN in the attention mask."""

    def pattern(self, op, x):
        return op.IsNaN(x)

    def check(self, context, x, **_):
        return _float_input(x)

    def rewrite(self, op, x, **_):
        return op.Not(op.Equal(x, x))


class TransposedWeightMatMulToGemm(pattern.RewriteRuleClassBase):
    """MatMul(x, Transpose(W)) with W an initializer (a tied LM head reading the embedding table) -> Gemm(transB=1)
    between Reshapes. The Transpose alone has only an initializer input, so the EP would run it on the host and
    copy the whole transposed table to the device on every run (671 MB for Gemma-3's vocabulary)."""

    def pattern(self, op, x, w):
        return op.MatMul(x, op.Transpose(w, _outputs=["wt"]))

    def check(self, context, x, w, wt, **_):
        result = pattern.MatchResult()
        if w.const_value is None or w.const_value.shape.rank() != 2:
            return result.fail("the transposed weight is not a 2-D initializer", w)
        if list(wt.producer().attributes.get_ints("perm", [1, 0])) != [1, 0]:
            return result.fail("the Transpose is not a plain 2-D transpose", wt)
        if x.shape is None or x.shape.rank() < 2:
            return result.fail("the activation's rank is unknown or below 2", x)
        return _float_input(x)

    def rewrite(self, op, x, w, **_):
        n, k = w.const_value.shape
        if x.shape.rank() == 2:
            return op.Gemm(x, w, transB=1)
        rows = op.Gemm(op.Reshape(x, op.Constant(value_ints=[-1, k])), w, transB=1)
        shape = op.Concat(op.Shape(x, end=-1), op.Constant(value_ints=[n]), axis=0)
        return op.Reshape(rows, shape)


DECOMPOSITIONS = pattern.RewriteRuleSet([
    TransposedWeightMatMulToGemm.rule(),
    DecomposeLayerNorm.rule(), DecomposeRmsNormalization.rule(), DecomposeSimplifiedLayerNormalization.rule(),
    DecomposeSkipSimplifiedLayerNorm.rule(), DecomposeSkipLayerNorm.rule(),
    DecomposeAttention.rule(), DecomposeMultiHeadAttention.rule(), DecomposeRotaryEmbedding.rule(),
    DecomposeMsRotaryEmbedding.rule(),
    DecomposeGelu.rule(), DecomposeMsGelu.rule(), DecomposeBiasGelu.rule(), DecomposeFastGelu.rule(),
    DecomposeQuickGelu.rule(), DecomposeIsNaN.rule(),
])


class DecomposeForCannPass(ir.passes.InPlacePass):
    """Rewrite non-whitelisted ops into whitelisted primitives; counts go to `model.meta["qtc.legalization"]`."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _op_counts(model)
        _name_unused_outputs(model.graph)
        count = 0
        for rule in DECOMPOSITIONS.rules:  # one rule at a time: a rule the rewriter cannot apply leaves its nodes
            try:                         # in place, and CheckCannGraphPass then lists them (a refusal, not a crash)
                count += pattern.RewriteRuleSet([rule]).apply_to_model(model)
            except ValueError as exc:
                warn(model, f"cann legalization: {getattr(rule, 'name', type(rule).__name__)} "
                            f"left its nodes ({exc})")
        after = _op_counts(model)
        model.meta[LEGALIZATION] = {
            "decomposed": {op: n - after.get(op, 0) for op, n in sorted(before.items())
                           if _is_decomposable(op) and n > after.get(op, 0)},
            "rewrites": count,
        }
        return ir.passes.PassResult(model, modified=count > 0)


def _name_unused_outputs(graph: ir.Graph) -> None:
    """Exporters leave optional outputs unnamed (the GenAI builder's Skip norms: output, '', '', sum); the rewriter
    pairs outputs by position, so unnamed ones get a name (they stay unused)."""
    for node in graph:
        for i, value in enumerate(node.outputs):
            if not value.name:
                value.name = f"{node.name or node.op_type}_unused_output_{i}"


def _is_decomposable(op: str) -> bool:
    return op in {"Transpose", "IsNaN", "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "Gelu",
                  f"{MS_DOMAIN}::Gelu", f"{MS_DOMAIN}::BiasGelu", f"{MS_DOMAIN}::FastGelu", f"{MS_DOMAIN}::QuickGelu",
                  f"{MS_DOMAIN}::SkipSimplifiedLayerNormalization", f"{MS_DOMAIN}::SkipLayerNormalization", "Attention",
                  "RotaryEmbedding", f"{MS_DOMAIN}::MultiHeadAttention", f"{MS_DOMAIN}::RotaryEmbedding"}


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        key = op_key(node)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _never_qdq(node: ir.Node) -> bool | None:
    # Folding DequantizeLinear would turn integer weights back into float ones; QuantizeLinear of a constant
    # is the same question. Everything else follows the folder's size limits.
    return False if node.op_type in QDQ_OPS else None


class FoldInitializerOnlyNodesPass(ir.passes.InPlacePass):
    """Fold nodes that only initializers and constants feed (the CANN EP refuses them), never Q/DQ; constants
    become initializers so that no Constant node is left to be judged."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = _constant_folding.fold_constants(model, should_fold=_never_qdq)
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.RemoveUnusedNodesPass()(model)
        common.RemoveUnusedOpsetsPass()(model)
        common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=result.modified)


class CheckCannGraphPass(ir.passes.InPlacePass):
    """Refuse a graph with nodes outside the whitelist (other than Q/DQ), listing them, unless fallback to the
    CPU is allowed; the list is recorded either way."""

    def __init__(self, allow_fallback: bool) -> None:
        super().__init__()
        self.allow_fallback = allow_fallback

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        offending = offending_nodes(model)
        model.meta.setdefault(LEGALIZATION, {})["cpu_fallback_nodes"] = offending
        if offending and not self.allow_fallback:
            shown = "; ".join(offending[:20]) + (f"; ... {len(offending) - 20} more" if len(offending) > 20 else "")
            raise QtcError(f"target cann cannot take {len(offending)} node(s) outside its graph-mode whitelist "
                           f"(pass --allow-fallback to run them on the CPU): {shown}")
        return ir.passes.PassResult(model, modified=False)


def legalization_passes(allow_fallback: bool = False) -> list[ir.passes.PassBase]:
    return [DecomposeForCannPass(), FoldInitializerOnlyNodesPass(), CheckCannGraphPass(allow_fallback)]
