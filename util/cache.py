"""Where derived artifacts (trained tokenizers, exported models) are cached, keyed by content hash."""

import hashlib
import os
from pathlib import Path

from qtc.errors import QtcError


def cache_dir(*parts: str) -> Path:
    """`$QTC_CACHE` or `~/.cache/qtc`, joined with `parts`, created on demand."""
    root = Path(os.environ.get("QTC_CACHE") or Path.home() / ".cache" / "qtc")
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only or missing location: the user's to fix, in one line
        raise QtcError(f"cache folder {path} cannot be created ({exc.strerror or exc}): set QTC_CACHE to a "
                       "writable folder") from None
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
