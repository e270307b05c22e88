"""`qtc eval` on real exported models and the real held-out Chinese splits."""

import json
import subprocess
import sys

import numpy as np
import pytest

import qtc
from qtc.backends import get_backend
from qtc.calibration.data import model_inputs
from qtc.errors import QtcError
from qtc.frontends.onnx_file import load_model
from qtc.measure.evaluation import evaluate
from qtc.measure.tasks import Runner


@pytest.fixture(scope="module")
def w8a8_llama(tiny_llama, tmp_path_factory):
    result = qtc.compile(tiny_llama, recipe="w8a8", calib="zh-news", samples=8, seq_len=128, compare=False, quiet=True)
    return result.save(tmp_path_factory.mktemp("eval") / "llama.w8a8.onnx")


def test_news_ppl_against_baseline(tiny_llama, w8a8_llama):
    result = evaluate(w8a8_llama, "zh-news-ppl", baseline=tiny_llama, limit=12, quiet=True)
    metrics = result["metrics"]
    assert result["data"]["units_scored"] == 12 and result["data"]["sha256"]
    bpc, base = metrics["bits_per_char"], metrics["baseline_bits_per_char"]
    assert bpc["ci95"][0] <= bpc["value"] <= bpc["ci95"][1]
    delta = metrics["delta_bits_per_char"]["value"]
    assert delta == pytest.approx(bpc["value"] - base["value"], abs=1e-9)
    assert 0 < metrics["kl_per_token"]["value"] < 0.5  # quantized, so not identical; not broken either
    assert 0.5 < metrics["top1_agreement"]["value"] <= 1.0
    assert result["model"]["metadata"]["qtc.calibration.source"] == "zh-news:calib"  # provenance echoed


def test_identical_model_has_zero_delta(tiny_llama):
    metrics = evaluate(tiny_llama, "zh-news-ppl", baseline=tiny_llama, limit=4, quiet=True)["metrics"]
    assert metrics["delta_bits_per_char"]["value"] == 0.0 and metrics["top1_agreement"]["value"] == 1.0


def test_same_seed_same_result(tiny_llama, w8a8_llama):
    runs = [evaluate(w8a8_llama, "zh-news-ppl", baseline=tiny_llama, limit=5, seed=7, quiet=True) for _ in range(2)]
    assert runs[0] == runs[1]


def test_reviews_zero_shot_decoder_runs(tiny_llama):
    metrics = evaluate(tiny_llama, "zh-reviews-acc", limit=10, quiet=True)["metrics"]
    assert 0.0 <= metrics["accuracy"]["value"] <= 1.0 and metrics["accuracy"]["n"] == 10


def test_sts_needs_baseline(tiny_llama):
    with pytest.raises(QtcError, match="baseline"):
        evaluate(tiny_llama, "minilm-sts", limit=2, quiet=True)


def test_cli_eval_json(tiny_llama, w8a8_llama):
    result = subprocess.run([sys.executable, "-m", "qtc.cli.main", "eval", str(w8a8_llama), "--task", "zh-news-ppl",
                             "--baseline", str(tiny_llama), "--limit", "3", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data["metrics"]) >= {"bits_per_char", "delta_bits_per_char", "kl_per_token", "top1_agreement"}


def test_cli_unknown_task(tiny_llama):
    result = subprocess.run([sys.executable, "-m", "qtc.cli.main", "eval", str(tiny_llama), "--task", "mmlu"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown task 'mmlu'" in result.stderr


def test_kv_decoder_is_scored_through_its_cache(kv_decoder, tiny_llama_reference):
    """Half the window as a prefill, the rest fed with the returned cache: the same logits as one cache-less run
    of the same weights, and the same bits/char as the cache-less export."""
    backend = get_backend("cpu")
    cached = Runner(backend.session(kv_decoder), model_inputs(load_model(kv_decoder)), "logits")
    plain = Runner(backend.session(tiny_llama_reference), model_inputs(load_model(tiny_llama_reference)), "logits")
    ids = np.arange(3, 40, dtype=np.int64)
    assert cached.has_cache and not plain.has_cache
    np.testing.assert_allclose(cached.run(ids), plain.run(ids), atol=2e-4)
    through_cache = evaluate(kv_decoder, "zh-news-ppl", limit=4, quiet=True)["metrics"]["bits_per_char"]["value"]
    cacheless = evaluate(tiny_llama_reference, "zh-news-ppl", limit=4, quiet=True)["metrics"]["bits_per_char"]["value"]
    assert through_cache == pytest.approx(cacheless, abs=1e-3)
