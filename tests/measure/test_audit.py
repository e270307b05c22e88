"""The calibration-language audit on real corpora: English pydoc text against Chinese news, and news against news."""

import json

import pytest

from qtc.measure.audit import audit_calibration, script_of, script_shares
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


def test_cli(kv_decoder, tmp_path):
    shown = qtc("audit-calib", "--calib", "en-pydoc", "--against", "zh-news", "--model", kv_decoder, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["warnings"]
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
