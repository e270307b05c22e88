"""A small character-level-seeded BPE tokenizer for Chinese, trained on the zh-news workload.

No byte-level alphabet: the initial alphabet is printable ASCII plus the corpus's most frequent characters
(three quarters of the vocabulary; rarer characters become "<unk>"). Merges never cross whitespace,
punctuation, digits (each digit is its own token, ASCII or full-width) or Han/non-Han boundaries. Whitespace
is kept as tokens and decoding concatenates tokens without spaces (`decoders.Fuse`).

Special tokens: "<pad>" 0, "<unk>" 1, "<bos>" 2, "<eos>" 3. No post-processor: `encode` adds no <bos>/<eos>;
callers prepend `BOS_ID` themselves when they want it. No normalizer: text is kept as is (full-width digits
stay full-width), so decode(encode(text)) == text for in-alphabet text.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from qtc.calibration.workloads import get_workload
from qtc.util.cache import cache_dir, sha256_text

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)

# Bump when anything that changes the trained JSON changes (pre-tokenizer, trainer options, ...).
TRAINER_VERSION = "qtc-zh-bpe-3"


# Printable ASCII and the space are always in the alphabet: the news corpus writes digits and Latin letters
# full-width, but other text (reviews, prompts) uses ASCII.
_ASCII = tuple(chr(c) for c in range(0x20, 0x7F))


def _alphabet(texts: list[str], vocab_size: int) -> list[str]:
    """The initial alphabet: ASCII plus the most frequent corpus characters, three quarters of the vocabulary.

    Chosen here rather than by the trainer's `limit_alphabet`, which breaks ties between equally rare characters
    in hash-map order (not reproducible). Ties here go by code point. On zh-news with 4096 this keeps ~3k of
    ~4.7k distinct characters, covering ~99.7 % of the characters.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    size = max(len(_ASCII) + 1, (vocab_size * 3) // 4 - len(SPECIAL_TOKENS))
    chosen = set(_ASCII)
    for ch, _n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) >= size:
            break
        chosen.add(ch)
    return sorted(chosen)


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # whitespace runs become their own pieces (kept, so decoding is lossless)
            pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
            # every punctuation character (ASCII and full-width, Unicode P*) is a piece of its own
            pre_tokenizers.Punctuation(behavior="isolated"),
            # every digit (ASCII and full-width) is a piece of its own, as in Llama
            pre_tokenizers.Digits(individual_digits=True),
            # Han runs apart from everything else (Latin words, symbols). Not `UnicodeScripts`, which drops the
            # whitespace pieces and so would make decoding lossy.
            pre_tokenizers.Split(Regex(r"\p{Han}+"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Fuse()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, seed: int = 0) -> Tokenizer:
    """Train the BPE on `texts`. Deterministic: the same texts and vocab size give byte-identical JSON.

    `seed` is recorded for the API's sake; the BPE trainer has no randomness (ties are broken by token order).
    """
    del seed
    texts = list(texts)
    tok = _new_tokenizer()
    alphabet = _alphabet(texts, vocab_size)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # every alphabet character is pinned (count = max); limiting to exactly their number drops the rest
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


def tokenizer_key(split_sha256: str, vocab_size: int) -> str:
    return sha256_text(json.dumps([split_sha256, vocab_size, TRAINER_VERSION]))


def zh_news_tokenizer(vocab_size: int = 4096) -> Path:
    """Path of `tokenizer.json` trained on zh-news "calib", cached under cache_dir("tokenizers", key)."""
    workload = get_workload("zh-news")
    key = tokenizer_key(workload.split_info("calib")["sha256"], vocab_size)
    folder = cache_dir("tokenizers", key)
    path = folder / "tokenizer.json"
    if path.is_file():
        return path
    tok = train_tokenizer(workload.texts("calib"), vocab_size=vocab_size)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, path)  # atomic: concurrent builders never see a half-written file
    return path
