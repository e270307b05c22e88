"""A small randomly initialised Llama-style decoder, exported to ONNX (dynamo exporter) for tests and benchmarks.

`build_tiny_llama()` builds `LlamaForCausalLM` (grouped-query attention, RMSNorm, SwiGLU MLP, RoPE, untied LM
head) from `torch.manual_seed(seed)`, exports it with `torch.onnx.export(..., dynamo=True)` and saves
`model.onnx` + `model.onnx.data` (external data) plus the model's own `tokenizer.json` in one folder.

Graph contract:
- inputs `input_ids` and `attention_mask`: int64 [batch, seq], both dims dynamic; output `logits`: float32
  [batch, seq, vocab]. No KV cache.
- every `nn.Linear` is a `MatMul(x, W)` whose input B is an initializer named after the torch parameter
  (`model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight`) but stored TRANSPOSED, [in, out], i.e. the
  exporter's `Transpose` of the weight is folded here (the names are kept, unlike the stock optimizer's
  `val_123`). RMSNorm weights stay one initializer per norm (no initializer deduplication, even though they are
  all ones at init).
- reproducible: the same arguments give byte-identical `model.onnx` and `model.onnx.data`. Stack traces and
  other run-dependent metadata are stripped; module-scope metadata (`namespace`, `pkg.torch.onnx.name_scopes`)
  is kept so nodes can be mapped back to modules.

The default output folder is `cache_dir("models", "tiny-llama-<key>")`, key = hash of the config, the
tokenizer's sha256, the exporter stack's versions and `EXPORT_VERSION`; an existing complete build is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from qtc.errors import QtcError
from qtc.frontends.torch_export import export_hashes, export_ids_mask_model, exporter_versions
from qtc.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, zh_news_tokenizer
from qtc.util.cache import cache_dir, sha256_file, sha256_text
from qtc.util.files import write_json_atomic

# Bump when the export recipe changes (graph normalisation, config defaults, ...).
EXPORT_VERSION = "qtc-tiny-llama-1"
BUILD_INFO = "qtc_build.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"


def tiny_llama_config(
    vocab_size: int,
    *,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 688,
    max_positions: int = 512,
):
    from transformers import LlamaConfig


    if hidden % heads or heads % kv_heads:
        raise QtcError(f"tiny llama: hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation="eager",
    )


def _make_wrapper():
    import torch

    class LogitsOnly(torch.nn.Module):
        """(input_ids, attention_mask) -> logits. Holds `model` and `lm_head` so names match HF's state dict."""

        def __init__(self, causal_lm):
            super().__init__()
            self.model = causal_lm.model
            self.lm_head = causal_lm.lm_head

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            return self.lm_head(hidden)

    # The class path lands in node metadata; pin it so `python -m` (module __main__) exports the same bytes.
    LogitsOnly.__module__ = "qtc.models.tiny_llama"
    LogitsOnly.__qualname__ = "LogitsOnly"
    return LogitsOnly


def make_tiny_llama(vocab_size: int, *, seed: int = 0, **config):
    """The torch model (LlamaForCausalLM, eval mode), initialised from `torch.manual_seed(seed)`."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(vocab_size, **config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model.eval()


def export_tiny_llama(model, path: Path, *, vocab_size: int) -> dict:
    """Export `model` (a LlamaForCausalLM) to `path` (+ `path.name + '.data'`). Returns facts about the export."""
    return export_ids_mask_model(_make_wrapper()(model).eval(), path, vocab_size=vocab_size)


def verify_onnx(model, onnx_path: Path, *, vocab_size: int, seed: int = 0) -> float:
    """Max |logits_onnxruntime - logits_torch| on a padded batch (mask positions compared where mask == 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(4, vocab_size, (3, 13), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    keep = mask.numpy().astype(bool)
    return float(np.abs(got[keep] - expected[keep]).max())


def _build_key(config: dict, tokenizer_sha: str) -> str:
    return sha256_text(json.dumps([EXPORT_VERSION, config, tokenizer_sha, exporter_versions()], sort_keys=True))


def build_tiny_llama(
    out_dir: Path | None = None,
    *,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 688,
    seed: int = 0,
    tokenizer_path: Path | None = None,
) -> Path:
    """Build (or reuse) the tiny Llama ONNX model; returns the path of `model.onnx`.

    `tokenizer_path` defaults to the zh-news BPE (`zh_news_tokenizer()`); the vocabulary size follows it, and the
    tokenizer is copied to `<model dir>/tokenizer.json`. A folder holding a complete build with the same key
    (see `qtc_build.json`) is reused without exporting.
    """
    if tokenizer_path is None:

        tokenizer_path = zh_news_tokenizer()
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise QtcError(f"tokenizer not found: {tokenizer_path}")
    vocab_size = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    config = dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                  max_positions=512, seed=seed, vocab_size=vocab_size)
    tokenizer_sha = sha256_file(tokenizer_path)
    key = _build_key(config, tokenizer_sha)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir("models", f"tiny-llama-{key[:16]}")
    onnx_path = out_dir / MODEL_FILE
    info_path = out_dir / BUILD_INFO
    if info_path.is_file() and onnx_path.is_file() and (out_dir / DATA_FILE).is_file():
        try:
            if json.loads(info_path.read_text()).get("key") == key:
                return onnx_path
        except (OSError, ValueError):
            pass

    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {k: config[k] for k in ("layers", "hidden", "heads", "kv_heads", "intermediate")}
    model = make_tiny_llama(vocab_size, seed=seed, **kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        tmp_onnx = Path(tmp) / MODEL_FILE
        facts = export_tiny_llama(model, tmp_onnx, vocab_size=vocab_size)
        max_diff = verify_onnx(model, tmp_onnx, vocab_size=vocab_size, seed=seed)
        if not max_diff < 1e-3:
            raise RuntimeError(f"exported tiny llama disagrees with torch: max |diff| {max_diff:g}")
        shutil.copyfile(tokenizer_path, Path(tmp) / TOKENIZER_FILE)
        # the data file first, the graph next, the build record last: a folder with the record is complete
        for name in (DATA_FILE, TOKENIZER_FILE, MODEL_FILE):
            os.replace(Path(tmp) / name, out_dir / name)
    info = {
        "key": key,
        "export_version": EXPORT_VERSION,
        "config": config,
        "tokenizer_sha256": tokenizer_sha,
        "versions": exporter_versions(),
        "n_params": n_params,
        "param_bytes_fp32": 4 * n_params,
        "max_abs_diff_vs_torch": max_diff,
        **facts,
        **export_hashes(onnx_path),
    }
    write_json_atomic(info_path, info)
    return onnx_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtc.models.tiny_llama", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the qtc cache)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: zh-news BPE)")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_llama(args.out, layers=args.layers, hidden=args.hidden, heads=args.heads,
                                kv_heads=args.kv_heads, intermediate=args.intermediate, seed=args.seed,
                                tokenizer_path=args.tokenizer)
    except QtcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
