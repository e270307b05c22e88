"""KV-cache decoders recognised by structure: which graph input is a past key/value and which output is the
present it becomes, whatever they are called (GenAI builder, Optimum and qtc exports name them differently).

A past input is a float rank-4 input [batch, kv_heads, past_seq, head_size] that reaches a graph output
  - through `Concat(past, new, axis=2)` (the standard form; Optimum, torch, qtc's own decoders), or
  - as input 3 / 4 of `com.microsoft::GroupQueryAttention`, whose outputs 1 / 2 are the presents (GenAI builder).
Only where neither is found are the conventional names paired (`past_key_values.N.key` -> `present.N.key`,
`past_key_values.N.value` -> `present.N.value`, `past.N.key` -> `present.N.key`)."""

from __future__ import annotations

import re

import onnx_ir as ir

from qtc.core.ops import MS_DOMAIN
from qtc.errors import QtcError

_PAST_NAME = re.compile(r"^past(?:_key_values)?[._](?P<layer>\d+)[._](?P<kind>key|value)$")
_GQA_CACHE = {3: 1, 4: 2}  # GroupQueryAttention: past_key -> present_key, past_value -> present_value


def _rank4_float(value: ir.Value) -> bool:
    return (value.shape is not None and value.shape.rank() == 4 and value.dtype is not None
            and value.dtype.is_floating_point())


def _through_concat(past: ir.Value, outputs: set[str]) -> str | None:
    for node, index in past.uses():
        # the past comes first (past + new tokens); the new keys are the other operand
        if node.op_type == "Concat" and index == 0 and node.domain in ("", "ai.onnx") and node.outputs[0].name in outputs:
            axis = node.attributes.get_int("axis", 0)
            if axis in (2, -2):
                return node.outputs[0].name
    return None


def _through_gqa(past: ir.Value, outputs: set[str]) -> str | None:
    for node, index in past.uses():
        if node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN and index in _GQA_CACHE:
            out = node.outputs[_GQA_CACHE[index]] if len(node.outputs) > _GQA_CACHE[index] else None
            if out is not None and out.name in outputs:
                return out.name
    return None


def _by_name(name: str, outputs: set[str]) -> str | None:
    match = _PAST_NAME.match(name)
    if match is None:
        return None
    present = f"present.{match['layer']}.{match['kind']}"
    return present if present in outputs else None


def cache_pairs(graph: ir.Graph) -> dict[str, str]:
    """{past input name: present output name} for every KV-cache input of the graph (empty: not a KV decoder)."""
    outputs = {v.name for v in graph.outputs}
    pairs = {}
    for value in graph.inputs:
        if value.is_initializer() or not _rank4_float(value):
            continue
        present = _through_concat(value, outputs) or _through_gqa(value, outputs) or _by_name(value.name, outputs)
        if present is not None:
            pairs[value.name] = present
    return dict(sorted(pairs.items()))


def is_kv_decoder(graph: ir.Graph) -> bool:
    return bool(cache_pairs(graph))


def cache_dims(graph: ir.Graph, past: str) -> tuple[int | None, int | None]:
    """(kv_heads, head_size) of a past input: its static dims, else what its GroupQueryAttention says (the GenAI
    builder declares head_size as a symbolic `kv_cache_dim`): kv_num_heads, and the query width over the heads
    (packed QKV: num_heads + 2 kv_num_heads of them)."""
    value = next(v for v in graph.inputs if v.name == past)
    dims = [d if isinstance(d, int) else None for d in value.shape]
    if dims[1] is not None and dims[3] is not None:
        return dims[1], dims[3]
    for node, index in value.uses():
        if node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN:
            heads, kv_heads = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
            query = node.inputs[0]
            width = query.shape[-1] if query is not None and query.shape is not None else None
            if heads and kv_heads and isinstance(width, int):
                packed = len(node.inputs) < 2 or node.inputs[1] is None
                return dims[1] or kv_heads, dims[3] or width // (heads + 2 * kv_heads if packed else heads)
    return dims[1], dims[3]


def cache_capacity(graph: ir.Graph, past: str) -> int:
    """The preallocated buffer the kernel reading `past` wants while a sequence fits in it: ORT's
    GroupQueryAttention with a sliding window (`local_window_size` W > 0: the GenAI builder's Gemma 3, qtc's fused
    one) refuses a cache shorter than W ("KV cache capacity (0) must be at least local_window_size"), because
    onnxruntime-genai hands it a preallocated buffer. The valid length comes from `seqlens_k`, not from the buffer,
    so a zero buffer of W rows is an empty cache (calibration/data.fit_past). 0 for every other reader."""
    value = next(v for v in graph.inputs if v.name == past)
    windows = [node.attributes.get_int("local_window_size", -1) for node, _ in value.uses()
               if node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN]
    return max([0, *windows])


def needs_shared_buffer(graph: ir.Graph) -> bool:
    """Whether onnxruntime-genai must run this decoder with `past_present_share_buffer` (a preallocated cache):
    some past is read by a kernel with a capacity (cache_capacity)."""
    return any(cache_capacity(graph, past) for past in cache_pairs(graph))


def windowed_cache(graph: ir.Graph, past: str) -> bool:
    """Whether the kernel reading `past` keeps a window-sized cache it evicts from itself (GroupQueryAttention
    `sliding_window_cache` = 1): its buffer is always `cache_capacity` rows, fed back as it comes out."""
    value = next(v for v in graph.inputs if v.name == past)
    return any(node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN
               and node.attributes.get_int("sliding_window_cache", 0) for node, _ in value.uses())


def sliding_window_layers(graph: ir.Graph, past_key_names: str) -> dict | None:
    """onnxruntime-genai's `sliding_window` entry for a decoder with windowed caches: the window and the layer
    numbers (read from past names like `past_key_values.%d.key`), or None when it has none."""
    pattern = re.compile(re.escape(past_key_names).replace("%d", r"(\d+)") + "$")
    layers, windows = [], set()
    for past in cache_pairs(graph):
        match = pattern.match(past)
        if match and windowed_cache(graph, past):
            layers.append(int(match.group(1)))
            windows.add(cache_capacity(graph, past))
    if not layers:
        return None
    if len(windows) != 1:
        raise QtcError(f"windowed KV caches of different sizes {sorted(windows)}: onnxruntime-genai takes one")
    return {"window_size": windows.pop(), "slide_key_value_cache": False, "slide_inputs": False,
            "layers": sorted(layers), "cache_slack": 0}
