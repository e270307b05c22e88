"""KV-cache attention in standard ops -> ORT's `com.microsoft::GroupQueryAttention` (the cpu decoder's attention).

What it matches is the form qtc's own KV exports write and the usual decomposition of a cached decoder layer:

    present_key   = Concat(past_key,   key,   axis=2)          [batch, kv_heads, past + seq, head_size]
    present_value = Concat(past_value, value, axis=2)
    keys / values = present_*, or expanded to the query heads (Unsqueeze, Expand, Reshape)
    probs  = Softmax(MatMul(query, Transpose(keys)) * scale + bias)
    output = Reshape(Transpose(MatMul(probs, values)), [batch, seq, heads * head_size])

where `bias` is a causal mask built from the model input `attention_mask` (with an optional sliding window).
Why: on ORT 1.32 CPU the decomposed form costs ~15 small kernels per layer and a copy of every expanded K/V head
per step (qwen2.5-coder-0.5b w4a8: 9.8 ms of a 32 ms decode step outside the MatMulNBits, against 2.4 ms in the
ORT GenAI builder's GroupQueryAttention graph). GroupQueryAttention reads the grouped K/V heads in place.

Layers with a sliding-window mask (Gemma 3's local layers) get the kernel's `local_window_size` and a windowed
cache (`sliding_window_cache`: a buffer of W rows holding the most recent positions, as the GenAI builder's Gemma 3
has it): their present is no longer the source's whole history, but its last rows (calibration/data.fit_past), and
the folder's genai_config.json lists those layers under `sliding_window`.
GroupQueryAttention takes each row's length from `seqlens_k` (= sum(attention_mask) - 1) and assumes padding only
at the end of a row, the way onnxruntime-genai feeds it; a left-padded batch row would differ from the source
graph, which masks any padding. qtc's own feed loops run batch 1 without padding. cuda is left out: ORT's CUDA
GroupQueryAttention takes float16/bfloat16 only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern

from qtc.core.ops import MS_DOMAIN
from qtc.util.spill import release, spill


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _ancestors(value: ir.Value, limit: int = 64) -> list[ir.Node]:
    """The nodes `value` is computed from, nearest first (a mask subgraph is a few dozen nodes)."""
    seen, order, stack = set(), [], [value]
    while stack and len(order) < limit:
        node = stack.pop().producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        stack.extend(v for v in node.inputs if v is not None)
    return order


def _graph_input(model: ir.Model, name: str) -> ir.Value | None:
    return next((v for v in model.graph.inputs if v.name == name), None)


def causal_mask_window(bias: ir.Value, model: ir.Model) -> tuple[bool, int | None, str]:
    """(is a causal mask from attention_mask, sliding window or None, why not). A mask is taken as causal when it
    is computed from the `attention_mask` input and compares key positions with query positions (LessOrEqual or
    Greater/Less of two Range-derived values); a window is a `Sub(query positions, constant)` inside it."""
    nodes = _ancestors(bias)
    mask_input = _graph_input(model, "attention_mask")
    if mask_input is None:
        return False, None, "the model has no attention_mask input to take sequence lengths from"
    if not any(mask_input in n.inputs for n in nodes):
        return False, None, "the attention bias is not computed from attention_mask"
    if not any(n.op_type in ("LessOrEqual", "Less", "Greater", "GreaterOrEqual", "Trilu") for n in nodes):
        return False, None, "the attention bias has no causal comparison of positions"
    windows = [_scalar(n.inputs[1]) for n in nodes if n.op_type == "Sub" and _scalar(n.inputs[1]) is not None]
    if len(windows) > 1:
        return False, None, "the attention bias has more than one constant offset (unknown window form)"
    return True, (int(windows[0]) if windows else None), ""


class CachedAttentionToGqa(pattern.RewriteRuleClassBase):
    """The decomposed cached attention above -> GroupQueryAttention(do_rotary=0) on the unexpanded K/V heads."""

    def __init__(self, expanded: bool) -> None:
        super().__init__(f"CachedAttentionToGqa{'Expanded' if expanded else ''}", remove_nodes=True)
        self.expanded, self._lengths = expanded, None

    def setup(self) -> None:
        self._lengths = None  # (seqlens_k, total_sequence_length), made by the first rewrite in a model

    def cleanup(self) -> None:
        self._lengths = None

    def pattern(self, op, query, key, value, past_key, past_value, scale, bias, key_groups, key_shape,
                value_groups, value_shape, out_shape):
        present_key = op.Concat(past_key, key, axis=2, _outputs=["present_key"])
        present_value = op.Concat(past_value, value, axis=2, _outputs=["present_value"])
        keys, values = present_key, present_value
        if self.expanded:
            keys = op.Reshape(op.Expand(op.Unsqueeze(present_key, [2]), key_groups), key_shape)
            values = op.Reshape(op.Expand(op.Unsqueeze(present_value, [2]), value_groups), value_shape)
        scores = op.Mul(op.MatMul(query, op.Transpose(keys, perm=[0, 1, 3, 2])), scale)
        probs = op.Softmax(op.Add(scores, bias), axis=-1)
        output = op.Reshape(op.Transpose(op.MatMul(probs, values), perm=[0, 2, 1, 3]), out_shape)
        return output, present_key, present_value

    def check(self, context, query, key, value, past_key, scale, bias, out_shape, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for name, v in (("query", query), ("key", key), ("value", value), ("past_key", past_key)):
            if not _ir_utils.has_rank(v, 4):
                return result.fail(f"{name} is not a 4-D [batch, heads, seq, head_size] tensor", v)
        heads, kv_heads, size = query.shape[1], key.shape[1], query.shape[3]
        if not all(isinstance(d, int) for d in (heads, kv_heads, size)) or heads % kv_heads:
            return result.fail(f"query heads {heads} are not a known multiple of K/V heads {kv_heads}", key)
        if _scalar(scale) is None:
            return result.fail("the score scale is not a constant scalar", scale)
        target = out_shape.const_value.numpy().tolist() if out_shape.const_value is not None else None
        if target not in ([0, 0, -1], [0, 0, heads * size]):
            return result.fail(f"the output reshape {target} does not merge the heads", out_shape)
        causal, window, why = causal_mask_window(bias, context.model)
        if not causal:
            return result.fail(why, bias)
        if window is not None and window < 1:
            return result.fail(f"sliding window {window} is not a positive number of keys", bias)
        self._mask = _graph_input(context.model, "attention_mask")
        self._window = window
        return result

    def rewrite(self, op, query, key, value, past_key, past_value, scale, **_):
        heads, kv_heads = query.shape[1], key.shape[1]
        mask = self._mask  # found by check() for this match
        if self._lengths is None:  # once per model: every layer reads the same lengths
            self._lengths = (op.Cast(op.Sub(op.ReduceSum(mask, op.Constant(value_ints=[1]), keepdims=0),
                                            op.Constant(value_int=1)), to=ir.DataType.INT32),
                             op.Cast(op.Squeeze(op.Shape(mask, start=1, end=2), op.Constant(value_ints=[0])),
                                     to=ir.DataType.INT32))
        lengths, total = self._lengths
        flat = [_merged_heads(op, x) for x in (query, key, value)]
        # the kernel's window W attends keys past + i - W < j <= past + i, the mask's (tests: W - 1 and W + 1 differ).
        # sliding_window_cache: the layer's cache is a W-row buffer the kernel evicts from (what onnxruntime-genai
        # allocates for the layers its genai_config lists under sliding_window): the memory of W tokens, not of
        # the whole sequence, and half the kernel time of a full-length buffer on gemma-3-270m (0.84 vs 1.54 ms).
        window = {} if self._window is None else {"local_window_size": self._window, "sliding_window_cache": 1}
        return op.GroupQueryAttention(*flat, past_key, past_value, lengths, total, _domain=MS_DOMAIN, _outputs=3,
                                      num_heads=heads, kv_num_heads=kv_heads, scale=_scalar(scale), **window)


def _split_heads_source(x: ir.Value) -> tuple[ir.Value, int] | None:
    """(y, heads) when x = Transpose(Reshape(y [batch, seq, heads * size], [0, 0, heads, size]), [0, 2, 1, 3])."""
    transpose = x.producer()
    if transpose is None or transpose.op_type != "Transpose" or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape" or reshape.inputs[1].const_value is None:
        return None
    shape = reshape.inputs[1].const_value.numpy().tolist()
    source = reshape.inputs[0]
    if len(shape) != 4 or shape[:2] != [0, 0] or not _ir_utils.has_rank(source, 3):
        return None
    return source, int(shape[2])


def _merged_heads(op, x: ir.Value) -> ir.Value:
    """x [batch, heads, seq, size] as GroupQueryAttention takes it, [batch, seq, heads * size]. Where x only splits
    the heads of such a tensor (value), or is a RotaryEmbedding over that split (query, key), the split is undone
    at the source (RotaryEmbedding takes the [batch, seq, hidden] form with num_heads) instead of transposing back:
    two Transposes and two Reshapes fewer per projection and step."""
    node = x.producer()
    if node is not None and node.op_type == "RotaryEmbedding" and node.domain == MS_DOMAIN:
        split = _split_heads_source(node.inputs[0])
        if split is not None:
            source, heads = split
            return op.RotaryEmbedding(source, *node.inputs[1:], _domain=MS_DOMAIN, num_heads=heads,
                                      interleaved=node.attributes.get_int("interleaved", 0))
    split = _split_heads_source(x)
    if split is not None:
        return split[0]
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


gqa_rules = pattern.RewriteRuleSet([CachedAttentionToGqa.rule(expanded=True), CachedAttentionToGqa.rule(expanded=False)],
                                   commute=False)


class PackQkvIntoGqa(pattern.RewriteRuleClassBase):
    """GroupQueryAttention over three projections of one input, each of Q and K rotated by RotaryEmbedding ->
    one MatMul over the concatenated weights (and biases) feeding GroupQueryAttention as packed QKV, which rotates
    Q and K itself (do_rotary, the same cos/sin tables and the model's position_ids).

    Why: a decode step then runs one MatMulNBits per layer for Q, K and V instead of three (with int8 activations
    quantized once, not three times) and no RotaryEmbedding kernels: the ORT GenAI builder's form. Exact: each
    output column of a block- or channel-quantized weight is quantized on its own, so the packed weight rounds as
    the three did; the compile pipeline leaves the projections apart for recipes where that does not hold
    (per-tensor weights) or that name q/k/v projections in an override (passes/pipeline.py `_unpackable`)."""

    def __init__(self, with_bias: bool) -> None:
        super().__init__(f"PackQkvIntoGqa{'Bias' if with_bias else ''}", remove_nodes=True)
        self.with_bias = with_bias

    def _projection(self, op, x, w, b):
        y = op.MatMul(x, w)
        return op.Add(y, b) if self.with_bias else y

    def pattern(self, op, x, wq, wk, wv, bq, bk, bv, positions, cos, sin, past_key, past_value, lengths, total):
        query = op.RotaryEmbedding(self._projection(op, x, wq, bq), positions, cos, sin, _domain=MS_DOMAIN,
                                   _allow_other_attributes=True, _outputs=["rotated_query"])
        key = op.RotaryEmbedding(self._projection(op, x, wk, bk), positions, cos, sin, _domain=MS_DOMAIN,
                                 _allow_other_attributes=True, _outputs=["rotated_key"])
        value = self._projection(op, x, wv, bv)
        return op.GroupQueryAttention(query, key, value, past_key, past_value, lengths, total, _domain=MS_DOMAIN,
                                      _allow_other_attributes=True, _outputs=["attention", "present_key", "present_value"])

    def check(self, context, x, wq, wk, wv, bq, bk, bv, positions, rotated_query, rotated_key, attention,
              **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        why = _qkv_weights_why_not(wq, wk, wv)
        if why is not None:
            return result.fail(why, [wq, wk, wv])
        if self.with_bias and any(b.const_value is None or b.const_value.shape.rank() != 1 for b in (bq, bk, bv)):
            return result.fail("a q/k/v bias is not a constant vector", [bq, bk, bv])
        why = _rotation_why_not(context.model, positions, rotated_query, rotated_key, attention)
        return result.fail(*why) if why is not None else result

    def rewrite(self, op, x, wq, wk, wv, bq, bk, bv, positions, cos, sin, past_key, past_value, lengths, total,
                rotated_query, attention, **_):
        qkv, module = _packed_matmul(op, x, wq, wk, wv)
        if self.with_bias:
            bias_name = _packed_name(bq.name)
            bias = np.concatenate([b.const_value.numpy() for b in (bq, bk, bv)])
            qkv = op.Add(qkv, op.initializer(ir.tensor(bias, name=bias_name), name=bias_name))
            qkv.producer().name = f"{module}/Add"
        interleaved = rotated_query.producer().attributes.get_int("interleaved", 0)
        return op.GroupQueryAttention(qkv, None, None, past_key, past_value, lengths, total, cos, sin, positions,
                                      _domain=MS_DOMAIN, _outputs=3, do_rotary=1, rotary_interleaved=interleaved,
                                      **_kept_attributes(attention))


class RotateNormedHeadsInGqa(pattern.RewriteRuleClassBase):
    """GroupQueryAttention whose Q and K are each split into heads, RMS-normalized per head (Gemma 3's q_norm /
    k_norm), rotated by RotaryEmbedding and merged back (two Transposes around the norm and the rotation) ->
    Reshape, norm, Reshape on the [batch, seq, heads, head_size] view (the norm is over head_size, so no transpose
    is needed) and the rotation inside the attention (do_rotary, the same cos/sin tables and position_ids).

    Why: the GenAI builder's Gemma 3 form; per layer and decode step two Transposes, two RotaryEmbedding kernels
    and their node overhead fewer (gemma-3-270m: ~1 ms of a 14 ms step). Exact: the same norm and rotation."""

    def __init__(self) -> None:
        super().__init__("RotateNormedHeadsInGqa", remove_nodes=True)

    @staticmethod
    def _head(op, x, split_shape, gamma, positions, cos, sin, merged_shape, name):
        heads = op.Transpose(op.Reshape(x, split_shape), perm=[0, 2, 1, 3])
        normed = op.SimplifiedLayerNormalization(heads, gamma, _allow_other_attributes=True, _outputs=[f"{name}_norm"])
        rotated = op.RotaryEmbedding(normed, positions, cos, sin, _domain=MS_DOMAIN, _allow_other_attributes=True,
                                     _outputs=[f"{name}_rotary"])
        return op.Reshape(op.Transpose(rotated, perm=[0, 2, 1, 3]), merged_shape)

    def pattern(self, op, xq, xk, value, q_shape, k_shape, q_gamma, k_gamma, positions, cos, sin, q_merged, k_merged,
                past_key, past_value, lengths, total):
        query = self._head(op, xq, q_shape, q_gamma, positions, cos, sin, q_merged, "q")
        key = self._head(op, xk, k_shape, k_gamma, positions, cos, sin, k_merged, "k")
        return op.GroupQueryAttention(query, key, value, past_key, past_value, lengths, total, _domain=MS_DOMAIN,
                                      _allow_other_attributes=True, _outputs=["attention", "present_key", "present_value"])

    def check(self, context, q_shape, k_shape, q_merged, k_merged, positions, q_norm, k_norm, q_rotary, k_rotary,
              attention, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for shape in (q_shape, k_shape, q_merged, k_merged):
            if shape.const_value is None:
                return result.fail("a head split or merge shape is not a constant", shape)
        if any(list(s.const_value.numpy()[:2]) != [0, 0] or s.const_value.numpy().size != n
               for s, n in ((q_shape, 4), (k_shape, 4), (q_merged, 3), (k_merged, 3))):
            return result.fail("the heads are not split from / merged into [batch, seq, hidden] in place", q_shape)
        if any(n.producer().attributes.get_int("axis", -1) not in (-1, 3) for n in (q_norm, k_norm)):
            return result.fail("the Q/K norm is not over head_size", q_norm)
        why = _rotation_why_not(context.model, positions, q_rotary, k_rotary, attention)
        return result.fail(*why) if why is not None else result

    def rewrite(self, op, xq, xk, value, q_shape, k_shape, q_gamma, k_gamma, positions, cos, sin, past_key,
                past_value, lengths, total, q_norm, k_norm, q_rotary, attention, **_):
        def normed(x, shape, gamma, norm):
            attributes = {k: v.value for k, v in norm.producer().attributes.items()}
            heads = op.SimplifiedLayerNormalization(op.Reshape(x, shape), gamma, **attributes)
            return op.Reshape(heads, op.Constant(value_ints=[0, 0, -1]))

        return op.GroupQueryAttention(normed(xq, q_shape, q_gamma, q_norm), normed(xk, k_shape, k_gamma, k_norm), value,
                                      past_key, past_value, lengths, total, cos, sin, positions, _domain=MS_DOMAIN,
                                      _outputs=3, do_rotary=1,
                                      rotary_interleaved=q_rotary.producer().attributes.get_int("interleaved", 0),
                                      **_kept_attributes(attention))


class PackNormedQkv(pattern.RewriteRuleClassBase):
    """GroupQueryAttention (rotating itself) over three projections of one input, Q and K normalized per head on
    the [batch, seq, heads, head_size] view (RotateNormedHeadsInGqa's form) -> one MatMul over the concatenated
    weights and a Split into Q, K, V before the same norms: the GenAI builder's Gemma 3 form (one MatMulNBits per
    layer for Q, K and V; gemma-3-270m: ~0.4 ms of a decode step). Exact as PackQkvIntoGqa is, and left out where
    it is (pipeline `_unpackable`)."""

    def __init__(self) -> None:
        super().__init__("PackNormedQkv", remove_nodes=True)

    def pattern(self, op, x, wq, wk, wv, q_shape, k_shape, q_gamma, k_gamma, q_merged, k_merged, past_key, past_value,
                lengths, total, cos, sin, positions):
        def head(w, shape, gamma, merged, name):
            normed = op.SimplifiedLayerNormalization(op.Reshape(op.MatMul(x, w), shape), gamma,
                                                     _allow_other_attributes=True, _outputs=[f"{name}_norm"])
            return op.Reshape(normed, merged)

        return op.GroupQueryAttention(head(wq, q_shape, q_gamma, q_merged, "q"), head(wk, k_shape, k_gamma, k_merged, "k"),
                                      op.MatMul(x, wv), past_key, past_value, lengths, total, cos, sin, positions,
                                      _domain=MS_DOMAIN, _allow_other_attributes=True,
                                      _outputs=["attention", "present_key", "present_value"])

    def check(self, context, wq, wk, wv, **_) -> pattern.MatchResult:
        why = _qkv_weights_why_not(wq, wk, wv)
        return pattern.MatchResult().fail(why, [wq, wk, wv]) if why is not None else pattern.MatchResult()

    def rewrite(self, op, x, wq, wk, wv, q_shape, k_shape, q_gamma, k_gamma, q_merged, k_merged, past_key, past_value,
                lengths, total, cos, sin, positions, q_norm, k_norm, attention, **_):
        widths = [int(w.const_value.shape[1]) for w in (wq, wk, wv)]
        qkv, _ = _packed_matmul(op, x, wq, wk, wv)
        query, key, value = op.Split(qkv, op.Constant(value_ints=widths), axis=-1, _outputs=3)

        def normed(y, shape, gamma, norm, merged):
            attributes = {k: v.value for k, v in norm.producer().attributes.items()}
            return op.Reshape(op.SimplifiedLayerNormalization(op.Reshape(y, shape), gamma, **attributes), merged)

        old = attention.producer().attributes
        return op.GroupQueryAttention(normed(query, q_shape, q_gamma, q_norm, q_merged),
                                      normed(key, k_shape, k_gamma, k_norm, k_merged), value, past_key, past_value,
                                      lengths, total, cos, sin, positions, _domain=MS_DOMAIN, _outputs=3,
                                      **{k: v.value for k, v in old.items()})


ATTENTION_ATTRIBUTES = ("num_heads", "kv_num_heads", "scale", "local_window_size", "sliding_window_cache")


def _kept_attributes(attention: ir.Value) -> dict:
    """The attention's own settings a rewrite carries over (heads, scale, its window and windowed cache)."""
    old = attention.producer().attributes
    return {key: old[key].value for key in ATTENTION_ATTRIBUTES if key in old}


def _qkv_weights_why_not(wq: ir.Value, wk: ir.Value, wv: ir.Value) -> str | None:
    """Why three projections cannot be packed into one MatMul, or None."""
    weights = [w.const_value for w in (wq, wk, wv)]
    if any(w is None or w.shape.rank() != 2 for w in weights) or len({w.shape[0] for w in weights}) != 1:
        return "the q/k/v weights are not constant [hidden, out] matrices of one input"
    if len({w.dtype for w in weights}) != 1:
        return "the q/k/v weights differ in type"
    return None


def _rotation_why_not(model: ir.Model, positions: ir.Value, rotated_query: ir.Value, rotated_key: ir.Value,
                      attention: ir.Value) -> tuple[str, ir.Value] | None:
    """Why the attention cannot rotate Q and K itself (do_rotary), with the value to blame, or None."""
    rotaries = [v.producer() for v in (rotated_query, rotated_key)]
    if len({(r.attributes.get_int("interleaved", 0), r.attributes.get_int("rotary_embedding_dim", 0)) for r in rotaries}) != 1 \
            or rotaries[0].attributes.get_int("rotary_embedding_dim", 0) != 0:
        return "Q and K are rotated differently or only partly", rotated_query
    if positions not in model.graph.inputs:
        return "the rotary positions are computed in the graph, not the position_ids input", positions
    if attention.producer().attributes.get_int("do_rotary", 0):
        return "the attention already rotates", attention
    return None


def _packed_matmul(op, x: ir.Value, wq: ir.Value, wk: ir.Value, wv: ir.Value) -> tuple[ir.Value, str]:
    """MatMul(x, [wq | wk | wv]), named by its module path (the report and the policy name layers by it); the
    three source weights' mappings are released."""
    name = _packed_name(wq.name)
    packed = np.concatenate([w.const_value.numpy() for w in (wq, wk, wv)], axis=1)
    for w in (wq, wk, wv):
        release(w.const_value)
    qkv = op.MatMul(x, op.initializer(spill(ir.tensor(packed, name=name)), name=name))
    module = name.removesuffix(".weight")
    qkv.producer().name = f"{module}/MatMul"
    return qkv, module


def _packed_name(q_name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> model.layers.3.self_attn.qkv_proj.weight (kept unique otherwise)."""
    return q_name.replace("q_proj", "qkv_proj") if "q_proj" in q_name else f"{q_name}.qkv_packed"


qkv_rules = pattern.RewriteRuleSet([PackQkvIntoGqa.rule(with_bias=True), PackQkvIntoGqa.rule(with_bias=False)],
                                   commute=True)
normed_rotary_rules = pattern.RewriteRuleSet([RotateNormedHeadsInGqa.rule()])
normed_qkv_rules = pattern.RewriteRuleSet([PackNormedQkv.rule()], commute=True)
