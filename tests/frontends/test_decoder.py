"""KV-cache decoders written as ONNX: the same logits as transformers, the cache path equal to a full prefill."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file

from qtc.errors import QtcError
from qtc.frontends.decoder import DecoderConfig, build_decoder, genai_config
from qtc.models.decoders import hf_decoder_config_from
from qtc.models.reference import get_reference, lm_config, load_info, load_weights, make_lm

ZH_TINY = DecoderConfig("llama", 4096, 256, 4, 4, 2, 688, 64)


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feed(cfg: DecoderConfig, ids: np.ndarray, past: dict | None, start: int) -> dict:
    feed = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], start + ids.shape[1]), np.int64),
            "position_ids": np.tile(np.arange(start, start + ids.shape[1]), (ids.shape[0], 1))}
    for layer in range(cfg.layers):
        for kind in ("key", "value"):
            empty = np.zeros((ids.shape[0], cfg.kv_heads, 0, cfg.head_size), np.float32)
            feed[f"past_key_values.{layer}.{kind}"] = past[f"present.{layer}.{kind}"] if past else empty
    return feed


def _run(session, feed):
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def _cache_path(session, cfg, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits of the last position of each run: a prefill of `prefill` tokens, then one token a step."""
    out = _run(session, _feed(cfg, ids[:, :prefill], None, 0))
    last = [out["logits"][:, -1]]
    for t in range(prefill, ids.shape[1]):
        out = _run(session, _feed(cfg, ids[:, t:t + 1], out, t))
        last.append(out["logits"][:, -1])
    return np.stack(last, axis=1)


def _assert_matches_transformers(model, cfg: DecoderConfig, session, ids: np.ndarray, prefill: int, tol: float) -> None:
    """Full-prefill logits equal transformers' (no cache), and the cache path (prefill, then one token a step)
    equals the full prefill."""
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids), use_cache=False).logits.numpy()
    full = _run(session, _feed(cfg, ids, None, 0))
    assert np.abs(full["logits"] - expected).max() < tol
    assert np.abs(_cache_path(session, cfg, ids, prefill=prefill) - full["logits"][:, prefill - 1:]).max() < tol


def test_zh_tiny_lm_decoder_matches_transformers_and_its_own_cache():
    weights = {k: v.astype(np.float32) for k, v in load_file(str(get_reference("zh-tiny-lm").weights)).items()}
    session = _session(build_decoder(ZH_TINY, weights))
    ids = np.random.default_rng(0).integers(4, 4096, (2, 16)).astype(np.int64)
    full = _run(session, _feed(ZH_TINY, ids, None, 0))
    model = make_lm(lm_config(load_info("zh-tiny-lm")))
    load_weights(model, get_reference("zh-tiny-lm").weights)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids), use_cache=False).logits.numpy()
    assert np.abs(full["logits"] - expected).max() < 1e-4
    assert full["present.3.key"].shape == (2, 2, 16, 64)
    stepped = _cache_path(session, ZH_TINY, ids, prefill=10)
    assert np.abs(stepped - full["logits"][:, 9:]).max() < 1e-4


def test_qwen2_layout_biases_and_tied_head_match_transformers():
    """Qwen2: q/k/v biases, grouped heads, a head tied to the embedding table (random small weights)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = DecoderConfig("qwen2", 300, 64, 2, 4, 2, 96, 16, rope_theta=1e6, rms_eps=1e-6, tied=True, qkv_bias=True)
    hf = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     attn_implementation="eager")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(hf).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    proto = build_decoder(cfg, weights)
    assert "lm_head.weight" not in {t.name for t in proto.graph.initializer}  # one table, read twice
    ids = np.random.default_rng(1).integers(0, 300, (1, 12)).astype(np.int64)
    _assert_matches_transformers(model, cfg, _session(proto), ids, prefill=5, tol=1e-4)


def test_padding_on_the_left_is_masked():
    """A left-padded row gives the same logits for its real tokens as the unpadded row alone."""
    weights = {k: v.astype(np.float32) for k, v in load_file(str(get_reference("zh-tiny-lm").weights)).items()}
    session = _session(build_decoder(ZH_TINY, weights))
    ids = np.random.default_rng(2).integers(4, 4096, (1, 8)).astype(np.int64)
    alone = _run(session, _feed(ZH_TINY, ids, None, 0))["logits"]
    padded = _feed(ZH_TINY, np.concatenate([np.zeros((1, 3), np.int64), ids], axis=1), None, 0)
    padded["attention_mask"][:, :3] = 0
    padded["position_ids"] = np.concatenate([np.zeros((1, 3), np.int64), np.arange(8)[None]], axis=1)
    assert np.abs(_run(session, padded)["logits"][:, 3:] - alone).max() < 1e-4


def test_genai_config_names_every_cache_tensor():
    config = genai_config(ZH_TINY, "model.onnx")["model"]
    decoder = config["decoder"]
    assert decoder["filename"] == "model.onnx" and decoder["num_key_value_heads"] == 2 and decoder["head_size"] == 64
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert config["type"] == "llama" and config["vocab_size"] == 4096


def test_missing_weight_is_named():
    with pytest.raises(QtcError, match="missing model.layers.0.input_layernorm.weight"):
        build_decoder(ZH_TINY, {"model.embed_tokens.weight": np.zeros((4096, 256), np.float32)})


def test_gemma3_layout_matches_transformers_with_a_sliding_window():
    """Gemma 3: (1 + w) norms, q/k norms, scaled embeddings, GELU-tanh, sandwich norms, a sliding window of 4
    on layers 0 and 1 with their own RoPE base, a full-attention layer 2, tied head (random small weights)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf = Gemma3TextConfig(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                          layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                          query_pre_attn_scalar=24, rope_theta=1e6, rope_local_base_freq=1e4, max_position_embeddings=64,
                          attn_implementation="eager", tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(hf).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    cfg = hf_decoder_config_from(hf.to_dict())
    assert cfg.sliding_layers == (0, 1) and cfg.sliding_window == 4 and cfg.rope_local_theta == 1e4
    session = _session(build_decoder(cfg, {k: v.numpy() for k, v in model.state_dict().items()}))
    ids = np.random.default_rng(3).integers(0, 260, (1, 11)).astype(np.int64)
    _assert_matches_transformers(model, cfg, session, ids, prefill=6, tol=2e-4)
