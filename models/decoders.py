"""Reference models as servable KV-cache decoders: an onnxruntime-genai folder (model.onnx + data,
genai_config.json, tokenizer files) built from committed weights by `frontends/decoder.py`, no torch needed.

`build_kv_decoder("zh-tiny-lm")` builds once into `cache_dir("models", "zh-tiny-lm-kv-<key>")` (key: weights,
tokenizer and builder version) and reuses a complete folder; `qtc export zh-tiny-lm --kv-cache` calls it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
from safetensors.numpy import load_file

from qtc.errors import QtcError
from qtc.frontends.decoder import GENAI_CONFIG, DecoderConfig, build_decoder, genai_config, read_genai_config
from qtc.frontends.onnx_file import load_model, save_model
from qtc.frontends.torch_export import export_hashes
from qtc.models.reference import TOKENIZER_FILE, get_reference, load_info
from qtc.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS
from qtc.util.cache import cache_dir, sha256_file, sha256_text
from qtc.util.files import write_json_atomic

BUILDER_VERSION = "qtc-kv-decoder-1"  # bump when frontends/decoder.py writes a different graph
MODEL_FILE = "model.onnx"
BUILD_INFO = "qtc_build.json"
KV_DECODERS = ("zh-tiny-lm",)


def decoder_config(name: str) -> DecoderConfig:
    if name not in KV_DECODERS:
        raise QtcError(f"no KV-cache build for {name!r} (have: {', '.join(KV_DECODERS)})")
    arch = load_info(name)["config"]
    return DecoderConfig("llama", arch["vocab_size"], arch["hidden"], arch["layers"], arch["heads"], arch["kv_heads"],
                         arch["intermediate"], arch["hidden"] // arch["heads"], context_length=arch["max_positions"],
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def tokenizer_config() -> dict:
    """tokenizer_config.json for the zh-news BPE (what Hugging Face and onnxruntime-genai tokenizers read)."""
    pad, unk, bos, eos = SPECIAL_TOKENS
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
            "unk_token": unk, "add_bos_token": False, "model_max_length": 512, "clean_up_tokenization_spaces": False}


def _key(name: str) -> str:
    ref = get_reference(name)
    return sha256_text(json.dumps([BUILDER_VERSION, sha256_file(ref.weights), sha256_file(TOKENIZER_FILE),
                                   decoder_config(name).to_json()], sort_keys=True))


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
    cfg = decoder_config(name)
    weights = {k: v.astype(np.float32) for k, v in load_file(str(get_reference(name).weights)).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        folder = Path(tmp)
        save_model(ir.from_proto(build_decoder(cfg, weights)), folder / MODEL_FILE, external_data=True)
        write_json_atomic(folder / GENAI_CONFIG, genai_config(cfg, MODEL_FILE))
        write_json_atomic(folder / "tokenizer_config.json", tokenizer_config())
        shutil.copyfile(TOKENIZER_FILE, folder / "tokenizer.json")
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
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(model.parent / name, output.parent / name)
    return output
