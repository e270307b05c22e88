"""The calibration-language audit: how well a calibration corpus covers the text a model will serve, seen through
the model's own tokenizer.

- token coverage: the share of the served text's tokens (occurrences) whose id never occurs in the calibration
  text ("unseen"), or occurs fewer than `rare` times ("rare"); the most frequent unseen tokens, decoded;
- unigram KL(served || calibration) in bits per token, the calibration counts add-one smoothed over the
  vocabulary (0 when the two have the same token distribution);
- script shares of the characters: CJK ideographs, Latin letters, digits, everything else.

A calibration set that leaves more than UNSEEN_WARN of the served tokens unseen, or whose CJK share differs from
the served text's by more than SCRIPT_WARN, gets a warning: its activation ranges and layer statistics were taken
on other text than the model will see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qtc.calibration.data import corpus_texts, load_tokenizer, served_texts, tokenizer_beside
from qtc.errors import QtcError

UNSEEN_WARN = 0.05
SCRIPT_WARN = 0.5
RARE = 5
TOP_UNSEEN = 10


def script_of(char: str) -> str:
    code = ord(char)
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x2FA1F:
        return "cjk"
    if char.isascii() and char.isalpha() or 0xC0 <= code <= 0x24F:
        return "latin"
    if char.isdigit():
        return "digit"
    return "other"


def script_shares(texts: list[str]) -> dict[str, float]:
    counts = {"cjk": 0, "latin": 0, "digit": 0, "other": 0}
    for text in texts:
        for char in text:
            counts[script_of(char)] += 1
    total = sum(counts.values()) or 1
    return {name: round(count / total, 4) for name, count in counts.items()}


def token_counts(tokenizer, texts: list[str], vocab: int) -> np.ndarray:
    counts = np.zeros(vocab, dtype=np.int64)
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = np.asarray(encoding.ids, dtype=np.int64)
        counts += np.bincount(ids[ids < vocab], minlength=vocab)
    return counts


def _side(texts: list[str], sha256: str, label: str, counts: np.ndarray) -> dict:
    return {"source": label, "sha256": sha256, "texts": len(texts), "chars": sum(map(len, texts)),
            "tokens": int(counts.sum()), "distinct_tokens": int((counts > 0).sum()), "scripts": script_shares(texts)}


def audit_calibration(calib: str, against: str, tokenizer_path: str | Path, rare: int = RARE) -> dict:
    """Audit calibration text `calib` (a file or workload: its calibration split) against served text `against`
    (a file, or a workload's eval split)."""
    tokenizer = load_tokenizer(Path(tokenizer_path))
    vocab = tokenizer.get_vocab_size()
    calib_texts, _, calib_sha, calib_label = corpus_texts(calib)
    served, served_sha, served_label = served_texts(against)  # what a workload serves is its eval split
    a, b = token_counts(tokenizer, calib_texts, vocab), token_counts(tokenizer, served, vocab)
    if not a.sum() or not b.sum():
        raise QtcError("audit-calib: a corpus tokenizes to no tokens")
    total = b.sum()
    unseen = b * (a == 0)
    p = b / total
    q = (a + 1) / (a.sum() + vocab)
    nonzero = p > 0
    top = np.argsort(-unseen, kind="stable")[:TOP_UNSEEN]
    calib_side = _side(calib_texts, calib_sha, calib_label, a)
    served_side = _side(served, served_sha, served_label, b)
    result = {
        "calibration": calib_side,
        "served": served_side,
        "tokenizer": Path(tokenizer_path).name,
        "unseen_token_share": round(float(unseen.sum() / total), 4),
        "rare_token_share": round(float(b[(a > 0) & (a < rare)].sum() / total), 4),
        "rare_below": rare,
        "unigram_kl_bits": round(float((p[nonzero] * np.log2(p[nonzero] / q[nonzero])).sum()), 4),
        "top_unseen": [{"token": tokenizer.decode([int(i)]), "id": int(i), "count": int(unseen[i])}
                       for i in top if unseen[i] > 0],
    }
    result["warnings"] = audit_warnings(result)
    return result


def audit_warnings(result: dict) -> list[str]:
    warnings = []
    if result["unseen_token_share"] > UNSEEN_WARN:
        warnings.append(f"{result['unseen_token_share']:.1%} of the served text's tokens never occur in the calibration "
                        f"text (warn above {UNSEEN_WARN:.0%})")
    cjk_gap = abs(result["calibration"]["scripts"]["cjk"] - result["served"]["scripts"]["cjk"])
    if cjk_gap > SCRIPT_WARN:
        warnings.append(f"CJK share {result['calibration']['scripts']['cjk']:.0%} in the calibration text vs "
                        f"{result['served']['scripts']['cjk']:.0%} in the served text")
    return warnings


def audit_tokenizer(tokenizer: str | Path | None, model: str | Path | None) -> Path:
    """--tokenizer, else the tokenizer.json beside --model."""
    if tokenizer:
        return Path(tokenizer)
    found = tokenizer_beside(Path(model)) if model else None
    if found is None:
        raise QtcError("audit-calib needs a tokenizer: pass --tokenizer, or --model with tokenizer.json beside it")
    return found
