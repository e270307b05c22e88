"""KV-cache decoders written directly as ONNX from Llama / Qwen2-family weights, in the onnxruntime-genai layout.

Why not a torch export: the dynamo exporter does not give a cache graph in the layout servers load, and a graph
written op by op is the same bytes for the same weights on every machine. The form is standard ONNX (opset 21),
the "standard equivalent" of GroupQueryAttention, so every qtc target (including cann) can take it:

  inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64, position_ids [batch, seq] int64,
           past_key_values.N.key / .value [batch, kv_heads, past, head_size] float32 (prefill: past = 0)
  outputs  logits [batch, seq, vocab] float32, present.N.key / .value [batch, kv_heads, past + seq, head_size]

Per layer: RMSNorm (the Pow/ReduceMean/Sqrt/Reciprocal form qtc fuses), q/k/v projections (with biases for
Qwen2), rotary embedding from position_ids, K/V appended to the past by Concat on axis 2 (the present), grouped
heads expanded, softmax attention under a causal + padding mask built once from attention_mask, o_proj, residual,
SwiGLU MLP, residual; then the final norm and the LM head (MatMul with the embedding table transposed when tied).
Projection weights are stored [in, out] under their Hugging Face names (`model.layers.0.mlp.down_proj.weight`), so
recipe globs and qtc's block discovery see them as in qtc's torch exports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qtc.core.decoder import needs_shared_buffer, sliding_window_layers
from qtc.errors import QtcError

OPSET = 21
GENAI_CONFIG = "genai_config.json"
PAST = "past_key_values.%d.%s"
PRESENT = "present.%d.%s"
_MASKED = float(np.finfo(np.float32).min)  # not -inf: a fully padded row then softmaxes to uniform, never NaN


@dataclass(frozen=True)
class DecoderConfig:
    """The architecture facts a decoder graph and its genai_config.json need."""

    family: str  # "llama" | "qwen2": the GenAI model type
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tied: bool = False
    qkv_bias: bool = False
    context_length: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Gemma 3: norms scale by (1 + w), q/k RMSNorm, embeddings times sqrt(hidden), GELU-tanh MLP, norms after the
    # attention and around the MLP, and sliding-window layers with their own RoPE base
    norm_offset: float = 0.0
    qk_norm: bool = False
    embed_scale: float | None = None
    mlp_act: str = "silu"
    sandwich_norms: bool = False
    attn_scale: float | None = None  # default 1 / sqrt(head_size)
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise QtcError(f"decoder: heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def scoped(node: onnx.NodeProto, scope: str) -> onnx.NodeProto:
    """Record the module a node belongs to as the torch exporter does (`pkg.torch.onnx.name_scopes`), so recipe
    globs (`*down_proj*`) and block discovery (`model.layers.3`) read this graph as they read qtc's torch exports."""
    entry = node.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.name_scopes", repr(["", scope, node.op_type])
    return node


class ExternalDataSink:
    """Writes each initializer's bytes to one external data file as the graph is built and hands back a
    TensorProto that points at them: a model larger than memory is built holding one tensor at a time."""

    ALIGN = 4096  # page-aligned offsets, so ONNX Runtime can memory-map each tensor

    def __init__(self, path: Path) -> None:
        self.path, self.file = Path(path), open(path, "wb")  # noqa: SIM115 - closed by close()

    def __call__(self, name: str, array: np.ndarray) -> TensorProto:
        offset = -self.file.tell() % self.ALIGN + self.file.tell()
        self.file.seek(offset)
        data = np.ascontiguousarray(array)
        self.file.write(memoryview(data).cast("B"))  # no bytes copy of a multi-GB tensor
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(data.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        self.file.close()


class _Graph:
    """Nodes and initializers, with names that say where they belong (`model.layers.0.attn/Softmax`)."""

    def __init__(self, weights: Mapping[str, np.ndarray], sink: ExternalDataSink | None = None) -> None:
        self.weights, self.nodes, self.initializers, self.count, self.sink = weights, [], {}, 0, sink

    def op(self, op_type: str, inputs: list[str], scope: str, outputs: int = 1, **attrs) -> str | list[str]:
        self.count += 1
        names = [f"{scope}/{op_type}_{self.count}" + (f":{i}" if outputs > 1 else "") for i in range(outputs)]
        self.nodes.append(scoped(helper.make_node(op_type, inputs, names, name=f"{scope}/{op_type}_{self.count}",
                                                  **attrs), scope))
        return names if outputs > 1 else names[0]

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self.initializers:
            big = self.sink is not None and array.size >= 1024
            # np.require, not np.ascontiguousarray: the latter makes a 0-d scalar [1], which onnxscript's fusion
            # patterns (Pow(x, 2.0), the attention scale) do not take as the scalar they name
            self.initializers[name] = self.sink(name, array) if big else numpy_helper.from_array(np.require(array, requirements="C"), name)
        return name

    def weight(self, name: str, transpose: bool = False, offset: float = 0.0) -> str:
        """A weight as an initializer of its own name; Gemma's RMSNorm (1 + w) comes in as `offset` 1."""
        if name not in self.weights:
            raise QtcError(f"decoder weights: missing {name}")
        array = np.asarray(self.weights[name], dtype=np.float32)
        array = array + np.float32(offset) if offset else array  # (+ 0.0 would turn -0.0 into +0.0)
        return self.const(name, array.T if transpose else array)

    def linear(self, x: str, name: str, bias: bool = False) -> str:
        """x @ W^T (+ b) for the Hugging Face Linear `name`; its nodes carry its module path as their scope."""
        y = self.op("MatMul", [x, self.weight(f"{name}.weight", transpose=True)], name)
        return self.op("Add", [y, self.weight(f"{name}.bias")], name) if bias else y

    def rms_norm(self, x: str, weight: str, eps: float, scope: str, offset: float = 0.0) -> str:
        square = self.op("Pow", [x, self.const("qtc.two", np.array(2.0, np.float32))], scope)
        mean = self.op("ReduceMean", [square, self.const("qtc.last_axis", np.array([-1], np.int64))], scope, keepdims=1)
        rms = self.op("Sqrt", [self.op("Add", [mean, self.const("qtc.eps", np.array(eps, np.float32))], scope)], scope)
        normed = self.op("Mul", [x, self.op("Reciprocal", [rms], scope)], scope)
        return self.op("Mul", [self.weight(weight, offset=offset), normed], scope)


def _ints(graph: _Graph, name: str, values) -> str:
    return graph.const(name, np.array(values, np.int64))


def _mask_bias(g: _Graph, window: int | None = None) -> str:
    """[batch, 1, seq, past + seq]: 0 where query i may attend key j (j <= past + i, key not padding, and with a
    sliding `window` also j > past + i - window), else the float minimum."""
    scope = "model.attention_mask"
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], scope), _ints(g, "qtc.one", 1)], scope, axis=0)
    seq = g.op("Gather", [g.op("Shape", ["input_ids"], scope), "qtc.one"], scope, axis=0)
    past = g.op("Sub", [total, seq], scope)
    keys = g.op("Range", [_ints(g, "qtc.zero", 0), total, "qtc.one"], scope)
    queries = g.op("Range", [past, total, "qtc.one"], scope)
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [keys, _ints(g, "qtc.axis0", [0])], scope),
                                  g.op("Unsqueeze", [queries, _ints(g, "qtc.axis1", [1])], scope)], scope)
    attended = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], scope, to=TensorProto.BOOL),
                                  _ints(g, "qtc.axes12", [1, 2])], scope)
    allowed = g.op("And", [causal, attended], scope)
    if window is not None:
        oldest = g.op("Sub", [g.op("Unsqueeze", [queries, "qtc.axis1"], scope), _ints(g, f"qtc.window{window}", window)], scope)
        recent = g.op("Greater", [g.op("Unsqueeze", [keys, "qtc.axis0"], scope), oldest], scope)
        allowed = g.op("And", [allowed, recent], scope)
    return g.op("Where", [allowed, g.const("qtc.zero_f", np.array(0.0, np.float32)),
                          g.const("qtc.masked", np.array(_MASKED, np.float32))], scope)


def _rotary(g: _Graph, cfg: DecoderConfig, theta: float) -> tuple[str, str]:
    """cos, sin [batch, 1, seq, head_size] of position_ids (the rotate-half convention of Llama, Qwen2, Gemma)."""
    scope = f"model.rotary_emb.{theta:g}"
    inv_freq = 1.0 / (theta ** (np.arange(0, cfg.head_size, 2, dtype=np.int64).astype(np.float32) / cfg.head_size))
    # Cast(Unsqueeze(positions, [2])), Slice on axis 3 (not -1) with steps: the forms the rotary fusions match
    positions = g.op("Cast", [g.op("Unsqueeze", ["position_ids", _ints(g, "qtc.axis2", [2])], scope)], scope, to=TensorProto.FLOAT)
    freqs = g.op("Mul", [positions, g.const(f"{scope}.inv_freq", inv_freq.astype(np.float32))], scope)
    angles = g.op("Concat", [freqs, freqs], scope, axis=-1)
    return (g.op("Unsqueeze", [g.op("Cos", [angles], scope), "qtc.axis1"], scope),
            g.op("Unsqueeze", [g.op("Sin", [angles], scope), "qtc.axis1"], scope))


def _rope(g: _Graph, x: str, cos: str, sin: str, half: int, scope: str) -> str:
    axis, step = _ints(g, "qtc.axis3", [3]), _ints(g, "qtc.step1", [1])
    first = g.op("Slice", [x, _ints(g, "qtc.zero1", [0]), _ints(g, f"qtc.half{half}", [half]), axis, step], scope)
    second = g.op("Slice", [x, f"qtc.half{half}", _ints(g, "qtc.end", [2**62]), axis, step], scope)
    rotated = g.op("Concat", [g.op("Neg", [second], scope), first], scope, axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], scope), g.op("Mul", [rotated, sin], scope)], scope)


def _heads(g: _Graph, x: str, n: int, size: int, scope: str) -> str:
    """[batch, seq, n * size] -> [batch, n, seq, size]."""
    return g.op("Transpose", [g.op("Reshape", [x, _ints(g, f"qtc.split{n}x{size}", [0, 0, n, size])], scope)], scope,
                perm=[0, 2, 1, 3])


def _expand_kv(g: _Graph, kv: str, cfg: DecoderConfig, scope: str) -> str:
    """[batch, kv_heads, total, size] -> [batch, heads, total, size] (each KV head serves heads / kv_heads)."""
    repeat = cfg.heads // cfg.kv_heads
    if repeat == 1:
        return kv
    wide = g.op("Expand", [g.op("Unsqueeze", [kv, _ints(g, "qtc.axis2", [2])], scope),
                           _ints(g, f"qtc.repeat{repeat}", [1, 1, repeat, 1, 1])], scope)
    return g.op("Reshape", [wide, _ints(g, f"qtc.merge{cfg.heads}", [0, cfg.heads, -1, cfg.head_size])], scope)


def _attention(g: _Graph, x: str, layer: int, cfg: DecoderConfig, cos: str, sin: str, bias: str,
               inputs: list, outputs: list) -> str:
    prefix = scope = f"model.layers.{layer}.self_attn"
    q = _heads(g, g.linear(x, f"{prefix}.q_proj", cfg.qkv_bias), cfg.heads, cfg.head_size, scope)
    k = _heads(g, g.linear(x, f"{prefix}.k_proj", cfg.qkv_bias), cfg.kv_heads, cfg.head_size, scope)
    v = _heads(g, g.linear(x, f"{prefix}.v_proj", cfg.qkv_bias), cfg.kv_heads, cfg.head_size, scope)
    if cfg.qk_norm:  # per head, over head_size
        q = g.rms_norm(q, f"{prefix}.q_norm.weight", cfg.rms_eps, f"{prefix}.q_norm", cfg.norm_offset)
        k = g.rms_norm(k, f"{prefix}.k_norm.weight", cfg.rms_eps, f"{prefix}.k_norm", cfg.norm_offset)
    half = cfg.head_size // 2
    q, k = _rope(g, q, cos, sin, half, scope), _rope(g, k, cos, sin, half, scope)
    cache = ["batch_size", cfg.kv_heads, "past_sequence_length", cfg.head_size]
    present = ["batch_size", cfg.kv_heads, "total_sequence_length", cfg.head_size]
    for kind, new in (("key", k), ("value", v)):
        inputs.append(helper.make_tensor_value_info(PAST % (layer, kind), TensorProto.FLOAT, cache))
        g.nodes.append(scoped(helper.make_node("Concat", [PAST % (layer, kind), new], [PRESENT % (layer, kind)],
                                               name=f"{scope}/Concat_{kind}", axis=2), scope))
        outputs.append(helper.make_tensor_value_info(PRESENT % (layer, kind), TensorProto.FLOAT, present))
    keys = _expand_kv(g, PRESENT % (layer, "key"), cfg, scope)
    values = _expand_kv(g, PRESENT % (layer, "value"), cfg, scope)
    scores = g.op("MatMul", [q, g.op("Transpose", [keys], scope, perm=[0, 1, 3, 2])], scope)
    factor = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / np.sqrt(cfg.head_size)
    scale = g.const(f"qtc.scale{factor:.9g}", np.array(factor, np.float32))
    probs = g.op("Softmax", [g.op("Add", [g.op("Mul", [scores, scale], scope), bias], scope)], scope, axis=-1)
    merged = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, values], scope)], scope, perm=[0, 2, 1, 3]),
                              _ints(g, "qtc.merge_heads", [0, 0, -1])], scope)
    return g.linear(merged, f"{prefix}.o_proj")


def _mlp(g: _Graph, x: str, layer: int, cfg: DecoderConfig) -> str:
    prefix, scope = f"model.layers.{layer}.mlp", f"model.layers.{layer}.mlp"
    gate = g.linear(x, f"{prefix}.gate_proj")
    if cfg.mlp_act == "gelu_tanh":
        act = g.op("Gelu", [gate], scope, approximate="tanh")
    else:
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], scope)], scope)  # SiLU
    return g.linear(g.op("Mul", [act, g.linear(x, f"{prefix}.up_proj")], scope), f"{prefix}.down_proj")


def _block(g: _Graph, x: str, layer: int, cfg: DecoderConfig, cos: str, sin: str, bias: str, inputs: list,
           outputs: list) -> str:
    """One decoder layer: x + attention(norm(x)), then + mlp(norm(.)); Gemma also norms each branch's output."""
    prefix, eps, offset = f"model.layers.{layer}", cfg.rms_eps, cfg.norm_offset
    attended = _attention(g, g.rms_norm(x, f"{prefix}.input_layernorm.weight", eps, f"{prefix}.input_layernorm", offset),
                          layer, cfg, cos, sin, bias, inputs, outputs)
    if cfg.sandwich_norms:
        attended = g.rms_norm(attended, f"{prefix}.post_attention_layernorm.weight", eps, f"{prefix}.post_attention_layernorm", offset)
        x = g.op("Add", [x, attended], prefix)
        mlp_in = g.rms_norm(x, f"{prefix}.pre_feedforward_layernorm.weight", eps, f"{prefix}.pre_feedforward_layernorm", offset)
        out = g.rms_norm(_mlp(g, mlp_in, layer, cfg), f"{prefix}.post_feedforward_layernorm.weight", eps,
                         f"{prefix}.post_feedforward_layernorm", offset)
        return g.op("Add", [x, out], prefix)
    x = g.op("Add", [x, attended], prefix)
    mlp_in = g.rms_norm(x, f"{prefix}.post_attention_layernorm.weight", eps, f"{prefix}.post_attention_layernorm", offset)
    return g.op("Add", [x, _mlp(g, mlp_in, layer, cfg)], prefix)


def build_decoder(cfg: DecoderConfig, weights: Mapping[str, np.ndarray],
                  sink: ExternalDataSink | None = None) -> onnx.ModelProto:
    """The decoder graph: weights inline as initializers (save it with external data), or, with a `sink`, written
    to its external data file one by one as `weights` hands them over (which may make each on demand)."""
    g = _Graph(weights, sink)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]
    x = g.op("Gather", [g.weight("model.embed_tokens.weight"), "input_ids"], "model.embed_tokens")
    if cfg.embed_scale is not None:
        x = g.op("Mul", [x, g.const("model.embed_tokens.scale", np.array(cfg.embed_scale, np.float32))], "model.embed_tokens")
    full = (_mask_bias(g), *_rotary(g, cfg, cfg.rope_theta))
    local = (_mask_bias(g, cfg.sliding_window), *_rotary(g, cfg, cfg.rope_local_theta or cfg.rope_theta)) \
        if cfg.sliding_layers else full
    for layer in range(cfg.layers):
        bias, cos, sin = local if layer in cfg.sliding_layers else full
        x = _block(g, x, layer, cfg, cos, sin, bias, inputs, outputs)
    x = g.rms_norm(x, "model.norm.weight", cfg.rms_eps, "model.norm", cfg.norm_offset)
    if cfg.tied:  # the head reads the embedding table itself (one copy; qtc recognises the tied head)
        table = g.op("Transpose", ["model.embed_tokens.weight"], "lm_head", perm=[1, 0])
        g.nodes.append(scoped(helper.make_node("MatMul", [x, table], ["logits"], name="lm_head/MatMul"), "lm_head"))
    else:
        g.nodes.append(scoped(helper.make_node("MatMul", [x, g.weight("lm_head.weight", transpose=True)], ["logits"],
                                               name="lm_head/MatMul"), "lm_head"))
    # Past inputs after the fixed ones, presents after logits, in layer order: the order servers expect.
    graph = helper.make_graph(g.nodes, "qtc_decoder", inputs, outputs, list(g.initializers.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qtc")
    model.ir_version = 10
    return model


def genai_config(cfg: DecoderConfig, model_file: str, *, provider: str = "cpu") -> dict:
    """onnxruntime-genai's genai_config.json for this decoder (../shared/docs/decoders.md has the layout)."""
    ids = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                             ("pad_token_id", cfg.pad_token_id)) if v is not None}
    return {
        "model": {
            **ids,
            "context_length": cfg.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [] if provider == "cpu" else [{provider: {}}]},
                "filename": model_file,
                "head_size": cfg.head_size,
                "hidden_size": cfg.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": PAST.replace("%s", "key"), "past_value_names": PAST.replace("%s", "value")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT.replace("%s", "key"),
                            "present_value_names": PRESENT.replace("%s", "value")},
                "num_attention_heads": cfg.heads,
                "num_hidden_layers": cfg.layers,
                "num_key_value_heads": cfg.kv_heads,
            },
            "type": cfg.family,
            "vocab_size": cfg.vocab_size,
        },
        "search": {"do_sample": False, "early_stopping": True, "max_length": cfg.context_length, "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _fit_cache_entries(config: dict, graph: ir.Graph) -> None:
    decoder = config.setdefault("model", {}).setdefault("decoder", {})
    if needs_shared_buffer(graph):
        config.setdefault("search", {})["past_present_share_buffer"] = True
    pattern = decoder.get("inputs", {}).get("past_key_names", PAST.replace("%s", "key"))
    window = sliding_window_layers(graph, pattern)
    if window is not None:
        decoder["sliding_window"] = window
    else:
        decoder.pop("sliding_window", None)  # the source's windowed caches are full-length in `out`


def read_genai_config(folder: Path) -> dict | None:
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QtcError(f"{path}: not valid JSON ({exc})") from None


# Files onnxruntime-genai (and Hugging Face) read beside the model, copied with it when qtc writes a compiled model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def servable_folder_files(source: Path, out: Path, graph: ir.Graph | None = None) -> dict[str, dict | Path]:
    """What makes `out` servable like `source`'s folder: genai_config.json naming `out` (as a dict) and the
    tokenizer files to copy. Where `out`'s `graph` has attention kernels that need them, the config asks for a
    preallocated, shared KV buffer and lists the window-sized caches under `sliding_window` (see
    core/decoder.py). Refuses to overwrite another model's genai_config.json in `out`'s folder."""
    config = read_genai_config(source.parent)
    files: dict[str, dict | Path] = {name: source.parent / name for name in TOKENIZER_FILES
                                     if (source.parent / name).is_file() and not (out.parent / name).exists()}
    if config is None:
        return files
    existing = read_genai_config(out.parent)
    if existing is not None and existing.get("model", {}).get("decoder", {}).get("filename") != out.name:
        raise QtcError(f"{out.parent / GENAI_CONFIG} belongs to another model: write {out.name} into its own folder")
    config.setdefault("model", {}).setdefault("decoder", {})["filename"] = out.name
    if graph is not None:
        _fit_cache_entries(config, graph)
    files[GENAI_CONFIG] = config
    return files
