"""The calibration-language audit on real corpora: English pydoc text against Chinese news, and news against news."""

import json

import pytest

from qtc.measure.audit import audit_calibration, script_of, script_shares
from qtc.measure.coverage import activation_coverage, coverage_warnings
from tests.cli.test_main import assert_bad_input, qtc


def test_scripts():
    assert [script_of(c) for c in "中a1，é"] == ["cjk", "latin", "digit", "other", "latin"]
    assert script_shares(["中文ab"]) == {"cjk": 0.5, "latin": 0.5, "digit": 0.0, "other": 0.0}


def test_english_calibration_under_covers_chinese_news(kv_decoder):
    result = audit_calibration("en-pydoc", "zh-news", kv_decoder.parent / "tokenizer.json")
    assert result["calibration"]["source"] == "en-pydoc:calib" and result["served"]["source"] == "zh-news:eval"
    assert result["calibration"]["scripts"]["cjk"] < 0.01 < 0.8 < result["served"]["scripts"]["cjk"]
    assert result["unseen_token_share"] > 0.5 and result["unigram_kl_bits"] > 3
    assert len(result["warnings"]) == 2 and result["top_unseen"]


def test_news_calibration_covers_news(kv_decoder):
    result = audit_calibration("zh-news", "zh-news", kv_decoder.parent / "tokenizer.json")
    assert result["unseen_token_share"] < 0.02 and result["unigram_kl_bits"] < 1 and result["warnings"] == []


def test_identical_text_has_zero_divergence(kv_decoder, chinese_corpus):
    result = audit_calibration(str(chinese_corpus), str(chinese_corpus), kv_decoder.parent / "tokenizer.json")
    assert result["unseen_token_share"] == 0 and result["unigram_kl_bits"] < 0.05  # only the add-one smoothing


def _coverage(kv_decoder, calib):
    return activation_coverage(kv_decoder, calib, "zh-news", kv_decoder.parent / "tokenizer.json", samples=4,
                               seq_len=64, quiet=True)


def test_english_calibration_ranges_clip_chinese_activations(kv_decoder):
    english, news = _coverage(kv_decoder, "en-pydoc"), _coverage(kv_decoder, "zh-news")
    assert english["served"] == news["served"] == "zh-news:eval" and english["activations"] == news["activations"] > 0
    # news ranges cover news (a few values per 100,000 beyond the range of other windows); English ranges do not
    assert news["clipped_share_max"] < 0.001 and news["activations_clipping"] == 0 and not coverage_warnings(news)
    assert english["clipped_share_max"] > 0.05 and english["clipped_share_mean"] > 50 * news["clipped_share_mean"]
    worst = english["worst"][0]
    assert worst["clipped_share"] == english["clipped_share_max"] and worst["served_over_calibration"] > 1
    assert worst["layer"].startswith("model.layers.") and "clip more than" in coverage_warnings(english)[0]


def test_cli(kv_decoder, tmp_path):
    shown = qtc("audit-calib", "--calib", "en-pydoc", "--against", "zh-news", "--model", kv_decoder, "--samples", "2",
                "--seq-len", "32", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["warnings"]
    assert json.loads(shown.stdout)["activation_coverage"]["samples"] == 2
    assert_bad_input(qtc("audit-calib", "--calib", "zh-news", "--against", "zh-news", "--model", kv_decoder, "--recipe",
                         "w8a16"), "recipe w8a16 quantizes no activation statically")
    assert_bad_input(qtc("audit-calib", "--calib", "zh-news", "--against", "zh-news"), "needs a tokenizer")
    assert_bad_input(qtc("audit-calib", "--calib", tmp_path / "none.txt", "--against", "zh-news", "--model", kv_decoder),
                     "calibration data not found")


@pytest.mark.parametrize("calib", [None, "en-pydoc"])
def test_compile_audits_its_calibration(kv_decoder, tmp_path, calib):
    args = ["compile", kv_decoder, "--recipe", "w8a16", "--audit-against", "zh-news", "-o", tmp_path / "m.onnx"]
    if calib is None:
        assert_bad_input(qtc(*args), "--audit-against audits the calibration text: pass --calib")
        return
    result = qtc(*args, "--calib", calib, "--samples", "4", "--seq-len", "32", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["calibration_audit"]["calibration"]["source"] == "en-pydoc:calib"
