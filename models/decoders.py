"""Reference models as servable KV-cache decoders: an onnxruntime-genai folder (model.onnx + data,
genai_config.json, tokenizer files) built from committed weights by `frontends/decoder.py`, no torch needed.

`build_kv_decoder("zh-tiny-lm")` builds once into `cache_dir("models", "zh-tiny-lm-kv-<key>")` (key: weights,
tokenizer and builder version) and reuses a complete folder; `qtc export zh-tiny-lm --kv-cache` calls it."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from safetensors import safe_open
from safetensors.numpy import load_file

from qtc.errors import QtcError
from qtc.frontends import hf
from qtc.frontends.decoder import (
    GENAI_CONFIG,
    DecoderConfig,
    ExternalDataSink,
    build_decoder,
    genai_config,
    read_genai_config,
)
from qtc.frontends.onnx_file import load_model, save_model
from qtc.frontends.torch_export import export_hashes
from qtc.models.reference import TOKENIZER_FILE, get_reference, load_info
from qtc.models.registry import reference_path
from qtc.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS
from qtc.util.cache import cache_dir, sha256_file, sha256_text
from qtc.util.files import write_json_atomic

BUILDER_VERSION = "qtc-kv-decoder-6"  # bump when frontends/decoder.py writes a different graph
MODEL_FILE = "model.onnx"
BUILD_INFO = "qtc_build.json"
KV_DECODERS = ("zh-tiny-lm", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m")
HF_FAMILIES = ("llama", "qwen2", "gemma3_text")


def hf_decoder_config(folder: Path) -> DecoderConfig:
    """A DecoderConfig from a Hugging Face config.json (see hf_decoder_config_from)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in HF_FAMILIES:
        raise QtcError(f"{folder.name}: KV-cache export takes {', '.join(HF_FAMILIES)} models, not {config.get('model_type')!r}")
    return hf_decoder_config_from(config)


def hf_decoder_config_from(config: dict) -> DecoderConfig:
    """A DecoderConfig from a Hugging Face config dict of a Llama, Qwen2 or Gemma 3 (text) causal LM."""
    family = config.get("model_type")
    heads = config["num_attention_heads"]
    head_size = config.get("head_dim") or config["hidden_size"] // heads
    ids = {k: v if not isinstance(v, list) else v[0] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if (v := config.get(k)) is not None}
    rope = config.get("rope_parameters") or {}
    common = dict(rms_eps=float(config.get("rms_norm_eps", 1e-6)), tied=bool(config.get("tie_word_embeddings")),
                  context_length=min(int(config.get("max_position_embeddings", 2048)), 32768), **ids)
    shape = (family, config["vocab_size"], config["hidden_size"], config["num_hidden_layers"], heads,
             config.get("num_key_value_heads", heads), config["intermediate_size"], head_size)
    if family == "gemma3_text":
        if config.get("final_logit_softcapping") or config.get("attn_logit_softcapping"):
            raise QtcError("Gemma 3 with logit soft-capping is not supported by the KV-cache builder")
        full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
        sliding = tuple(i for i, kind in enumerate(config.get("layer_types") or []) if kind == "sliding_attention")
        return DecoderConfig(*shape, rope_theta=float(full.get("rope_theta", config.get("rope_theta", 1e6))),
                             norm_offset=1.0, qk_norm=True, embed_scale=float(np.float32(config["hidden_size"] ** 0.5)),
                             mlp_act="gelu_tanh", sandwich_norms=True,
                             attn_scale=float(config.get("query_pre_attn_scalar", head_size)) ** -0.5,
                             sliding_window=config.get("sliding_window") if sliding else None, sliding_layers=sliding,
                             rope_local_theta=float(local.get("rope_theta", config.get("rope_local_base_freq", 1e4))),
                             **common)
    return DecoderConfig(*shape, rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                         qkv_bias=family == "qwen2" or bool(config.get("attention_bias")), **common)


class SafetensorsWeights(Mapping):
    """A Hugging Face folder's weights as float32 arrays, each read from its memory-mapped .safetensors file when
    asked for: a 1.5 B model's 7 GB are never all in memory at once while its decoder is written."""

    def __init__(self, folder: Path) -> None:
        self.where: dict[str, Path] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="np") as f:
                self.where.update({name: file for name in f.keys()})
        if not self.where:
            raise QtcError(f"{folder}: no .safetensors weights")

    def __getitem__(self, name: str) -> np.ndarray:
        with safe_open(str(self.where[name]), framework="np") as f:
            return f.get_tensor(name).astype(np.float32, copy=False)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def hf_weights(folder: Path) -> SafetensorsWeights:
    return SafetensorsWeights(folder)


def decoder_config(name: str) -> DecoderConfig:
    if name not in KV_DECODERS:
        raise QtcError(f"no KV-cache build for {name!r} (have: {', '.join(KV_DECODERS)})")
    if name != "zh-tiny-lm":
        return hf_decoder_config(_hf_folder(name))
    arch = load_info(name)["config"]
    return DecoderConfig("llama", arch["vocab_size"], arch["hidden"], arch["layers"], arch["heads"], arch["kv_heads"],
                         arch["intermediate"], arch["hidden"] // arch["heads"], context_length=arch["max_positions"],
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def tokenizer_config() -> dict:
    """tokenizer_config.json for the zh-news BPE (what Hugging Face and onnxruntime-genai tokenizers read)."""
    pad, unk, bos, eos = SPECIAL_TOKENS
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
            "unk_token": unk, "add_bos_token": False, "model_max_length": 512, "clean_up_tokenization_spaces": False}


def _hf_folder(name: str) -> Path:
    """The dequantized Hugging Face copy of a registry model's GGUF (made once; transformers' dequantizer)."""
    path, files = reference_path(name)
    return hf.gguf_to_hf(path, gguf_sha256=next(iter(files.values())))


def _key(name: str) -> str:
    if name == "zh-tiny-lm":
        sources = [sha256_file(get_reference(name).weights), sha256_file(TOKENIZER_FILE)]
    else:
        sources = sorted(reference_path(name)[1].values())
    return sha256_text(json.dumps([BUILDER_VERSION, *sources, decoder_config(name).to_json()], sort_keys=True))


def _sources(name: str) -> tuple[DecoderConfig, dict[str, np.ndarray], dict[str, Path | dict]]:
    """Config, float32 weights and the tokenizer files of a KV-decoder build."""
    cfg = decoder_config(name)
    if name == "zh-tiny-lm":
        weights = {k: v.astype(np.float32) for k, v in load_file(str(get_reference(name).weights)).items()}
        return cfg, weights, {"tokenizer.json": TOKENIZER_FILE, "tokenizer_config.json": tokenizer_config()}
    folder = _hf_folder(name)
    files = {f: folder / f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                     "chat_template.jinja") if (folder / f).is_file()}
    return cfg, hf_weights(folder), files


def build_kv_decoder(name: str, out_dir: Path | None = None) -> Path:
    """Build (or reuse) the KV-cache decoder folder of a reference model; returns its model.onnx."""
    key = _key(name)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir("models", f"{name}-kv-{key[:16]}")
    onnx_path = out_dir / MODEL_FILE
    try:
        if json.loads((out_dir / BUILD_INFO).read_text()).get("key") == key and onnx_path.is_file():
            return onnx_path
    except (OSError, ValueError):
        pass
    cfg, weights, tokenizer_files = _sources(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        folder = Path(tmp)
        sink = ExternalDataSink(folder / f"{MODEL_FILE}.data")  # each weight written as it is made: one at a time
        try:
            proto = build_decoder(cfg, weights, sink)
        finally:
            sink.close()
        onnx.save(proto, folder / MODEL_FILE)
        write_json_atomic(folder / GENAI_CONFIG, genai_config(cfg, MODEL_FILE))
        for file_name, source in tokenizer_files.items():
            if isinstance(source, dict):
                write_json_atomic(folder / file_name, source)
            else:
                shutil.copyfile(source, folder / file_name)
        for file in sorted(folder.iterdir()):
            file.replace(out_dir / file.name)
    write_json_atomic(out_dir / BUILD_INFO, {"key": key, "name": name, "builder": BUILDER_VERSION,
                                             "config": json.loads(cfg.to_json()), **export_hashes(onnx_path)})
    return onnx_path


def copy_decoder(model: Path, output: Path) -> Path:
    """The decoder folder's files, with the model saved as `output` (an .onnx path in an empty or new folder)."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise QtcError(f"--output must name an .onnx file, got {output}")
    config = read_genai_config(model.parent)
    if (output.parent / GENAI_CONFIG).exists():
        raise QtcError(f"{output.parent} already holds a genai_config.json: export into a new folder")
    save_model(load_model(model), output, external_data=True)
    config["model"]["decoder"]["filename"] = output.name
    write_json_atomic(output.parent / GENAI_CONFIG, config)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (model.parent / name).is_file():
            shutil.copyfile(model.parent / name, output.parent / name)
    return output
