"""Calibration data: a text corpus (or a named workload) packed into seeded token windows, or .npz tensors.

Every set knows its provenance (source, sha256, sample count, sequence length, seed, tokenizer) and keeps a
held-out part that calibration never sees, used for the float-vs-compiled comparison in the report.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx_ir as ir
from tokenizers import Tokenizer

from qtc.calibration import workloads
from qtc.core.decoder import cache_capacity, cache_dims, cache_pairs, windowed_cache
from qtc.errors import QtcError
from qtc.util.cache import sha256_file

TOKENIZER_FILE = "tokenizer.json"
HELDOUT_SAMPLES = 8
HELDOUT_FRACTION = 0.1
EOS_TOKENS = ("<eos>", "</s>", "<|endoftext|>", "[SEP]")
BOS_TOKENS = ("<bos>", "<s>", "<|begin_of_text|>", "[CLS]")
_TOKEN_INPUTS = ("input_ids", "ids", "tokens")
# Calibration of a KV-cache decoder: the last tokens of each window arrive as one-token decode steps, those of
# DECODE_BATCH windows together
DECODE_STEPS = 4
DECODE_BATCH = 8


def tokenizer_beside(model_path: Path | None) -> Path | None:
    """A model's own tokenizer: `tokenizer.json` in its folder, where exports and compiles put it."""
    if model_path is None:
        return None
    path = Path(model_path).parent / TOKENIZER_FILE
    return path if path.is_file() else None


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    rank: int | None
    shape: tuple = ()  # static dims as ints, the others as None
    present: str | None = None  # a KV-cache input: the output its next value comes from (core/decoder.py)
    capacity: int = 0  # a KV-cache input: the shortest buffer its kernel takes (core/decoder.cache_capacity)
    windowed: bool = False  # ... a window-sized buffer the kernel evicts from (core/decoder.windowed_cache)


def model_inputs(model: ir.Model) -> list[InputSpec]:
    specs = []
    cache = cache_pairs(model.graph)
    for value in model.graph.inputs:
        if value.is_initializer():
            continue  # an input with a default (e.g. a layer-skip `budget`): feeding it is optional
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        rank = value.shape.rank() if value.shape is not None else None
        shape = tuple(d if isinstance(d, int) else None for d in value.shape) if value.shape is not None else ()
        if value.name in cache and len(shape) == 4:
            kv_heads, head_size = cache_dims(model.graph, value.name)
            shape = (shape[0], kv_heads, shape[2], head_size)
        capacity = cache_capacity(model.graph, value.name) if value.name in cache else 0
        windowed = bool(capacity) and windowed_cache(model.graph, value.name)
        specs.append(InputSpec(value.name, np.dtype(dtype), rank, shape, cache.get(value.name), capacity, windowed))
    return specs


def empty_past(spec: InputSpec, new: int, batch: int = 1) -> np.ndarray:
    """A KV-cache input for a prefill of `new` tokens: [batch, kv_heads, rows, head_size] (its static dims from the
    graph), no rows, or a zero buffer where the kernel wants one (see fit_past; its valid length is 0 either way)."""
    if len(spec.shape) != 4 or spec.shape[1] is None or spec.shape[3] is None:
        raise QtcError(f"KV-cache input {spec.name!r} needs static kv_heads and head_size dims (has {spec.shape})")
    rows = spec.capacity if spec.windowed or 0 < new <= spec.capacity else 0
    return np.zeros((batch, spec.shape[1], rows, spec.shape[3]), dtype=spec.dtype)


def fit_past(spec: InputSpec, present: np.ndarray, valid: int, new: int) -> np.ndarray:
    """The past to feed with `new` tokens after `valid` cached ones, from the present the run before returned.
    ORT 1.32's GroupQueryAttention with a sliding window (capacity W > 0) takes a cache in one of two forms: a
    preallocated buffer at least as long as the total (what onnxruntime-genai's shared buffer is), or exactly the
    valid rows, and then only when those rows plus the new ones are at least W ("KV cache capacity must be at least
    local_window_size"). So: a W-row buffer while the total fits in W, the valid rows after. A windowed cache
    (`sliding_window_cache`) is its W-row buffer at every step, the most recent positions first: as it came out."""
    if spec.capacity and not spec.windowed and valid + new > spec.capacity:
        return present[:, :, :valid]  # a W-row buffer only partly valid, then a chunk that runs past W
    return present  # a step within W returned its W-row buffer; one past W, exactly its valid rows


def prefill_for(inputs: list[InputSpec], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A prefill feed built for another form of the same model (empty pasts of 0 rows) with each empty past as
    `inputs`' kernels take it (empty_past): a compiled model's windowed caches want their W-row buffers."""
    token = token_input(inputs).name
    adapted = dict(feed)
    for spec in inputs:
        past = feed.get(spec.name)
        if spec.capacity and past is not None and past.shape[2] == 0 and token in feed:
            adapted[spec.name] = empty_past(spec, feed[token].shape[1], batch=past.shape[0])
    return adapted


def resident_rows(spec: InputSpec, present: np.ndarray, history: int) -> np.ndarray:
    """The rows of a windowed cache's present that hold positions (the most recent min(T, W) of a sequence of
    `history` = T tokens, at rows [0, L): ORT's layout for capacity W), to compare with the last rows of a
    full-length cache; the present as it is for any other cache."""
    return present[:, :, : min(history, spec.capacity)] if spec.windowed else present


@dataclass
class CalibrationSet:
    """Samples for calibration plus held-out samples, as model feeds. Small: token windows or file paths."""

    source: str
    kind: str  # "text" | "npz"
    sha256: str
    seq_len: int | None
    seed: int
    tokenizer: str | None = None
    tokenizer_sha256: str | None = None
    vocab_size: int | None = None
    calib_samples: list = field(default_factory=list, repr=False)
    heldout_samples: list = field(default_factory=list, repr=False)

    @property
    def n_samples(self) -> int:
        return len(self.calib_samples)

    def provenance(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "sha256": self.sha256,
            "samples": self.n_samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "tokenizer": self.tokenizer,
            "tokenizer_sha256": self.tokenizer_sha256,
            "heldout_samples": len(self.heldout_samples),
        }

    def feeds(self, inputs: list[InputSpec], heldout: bool = False) -> Iterator[dict[str, np.ndarray]]:
        samples = self.heldout_samples if heldout else self.calib_samples
        for sample in samples:
            yield text_feed(sample, inputs) if self.kind == "text" else npz_feed(sample, inputs)


# --------------------------------------------------------------------------------------------- text


def read_corpus(path: Path) -> list[str]:
    """Paragraphs of a plain-text file (one a line) or a JSONL file with a `text` field."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise QtcError(f"calibration corpus {path} is not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return [line.strip() for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(str(record["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise QtcError(f"{path.name} line {number}: expected a JSON object with a 'text' field") from None
    return texts


def load_tokenizer(path: Path):

    if not path.is_file():
        raise QtcError(f"tokenizer not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a plain Exception with a JSON error
        raise QtcError(f"{path.name} is not a tokenizers JSON file ({str(exc).splitlines()[0]})") from None
    # Some tokenizer.json files pad or truncate every input (MiniLM's pads to 128): padding would put pad
    # tokens into calibration windows, truncation would cut evaluation paragraphs. qtc packs windows itself.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _special_id(tokenizer, names: tuple[str, ...]) -> int | None:
    return next((tokenizer.token_to_id(t) for t in names if tokenizer.token_to_id(t) is not None), None)


def bos_id(tokenizer) -> int | None:
    """The beginning-of-sequence token, when the tokenizer has one of the usual spellings."""
    return _special_id(tokenizer, BOS_TOKENS)


def eos_id(tokenizer) -> int | None:
    return _special_id(tokenizer, EOS_TOKENS)


def tokenize(tokenizer, texts: list[str]) -> np.ndarray:
    """One token stream: paragraphs joined by the end-of-sequence token when the tokenizer has one."""
    eos = eos_id(tokenizer)
    parts = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        parts.append(encoding.ids)
        if eos is not None:
            parts.append([eos])
    return np.fromiter((i for p in parts for i in p), dtype=np.int64)


def sample_windows(tokens: np.ndarray, n: int, seq_len: int, rng: np.random.Generator) -> list[np.ndarray]:
    starts = len(tokens) - seq_len + 1
    if starts < 1:
        raise QtcError(f"corpus too small: {len(tokens)} tokens for calibration, need at least --seq-len {seq_len}")
    chosen = np.sort(rng.choice(starts, size=n, replace=starts < n))
    return [tokens[s : s + seq_len] for s in chosen]


def heldout_windows(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Evenly spaced windows, no randomness: the same held-out text for every recipe and seed."""
    length = min(seq_len, len(tokens))
    if length < 8:
        return []
    starts = np.linspace(0, len(tokens) - length, num=min(HELDOUT_SAMPLES, len(tokens) // length or 1)).astype(int)
    return [tokens[s : s + length] for s in starts]


def text_calibration(
    source: str,
    tokenizer_path: Path,
    n_samples: int,
    seq_len: int,
    seed: int,
) -> CalibrationSet:
    """A corpus file or a workload name, tokenized, packed into `n_samples` windows of `seq_len` tokens."""
    calib_texts, heldout_texts, digest, label = corpus_texts(source)
    tokenizer = load_tokenizer(tokenizer_path)
    calib_tokens = tokenize(tokenizer, calib_texts)
    if heldout_texts is None:  # a plain file: its last 10 % of tokens is held out
        cut = int(len(calib_tokens) * (1 - HELDOUT_FRACTION))
        calib_tokens, heldout_tokens = calib_tokens[:cut], calib_tokens[cut:]
    else:
        heldout_tokens = tokenize(tokenizer, heldout_texts)
    rng = np.random.default_rng(seed)
    return CalibrationSet(
        source=label,
        kind="text",
        sha256=digest,
        seq_len=seq_len,
        seed=seed,
        tokenizer=tokenizer_path.name,
        tokenizer_sha256=sha256_file(tokenizer_path),
        vocab_size=tokenizer.get_vocab_size(),
        calib_samples=sample_windows(calib_tokens, n_samples, seq_len, rng),
        heldout_samples=heldout_windows(heldout_tokens, seq_len),
    )


def served_calibration(source: str, tokenizer_path: Path, n_samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """Windows of the text a model will serve, fed like calibration windows: a workload's eval split, or a whole
    file (what `qtc audit-calib --against` names)."""
    texts, digest, label = served_texts(source)
    tokenizer = load_tokenizer(tokenizer_path)
    return CalibrationSet(source=label, kind="text", sha256=digest, seq_len=seq_len, seed=seed,
                          tokenizer=tokenizer_path.name, tokenizer_sha256=sha256_file(tokenizer_path),
                          vocab_size=tokenizer.get_vocab_size(),
                          calib_samples=sample_windows(tokenize(tokenizer, texts), n_samples, seq_len,
                                                       np.random.default_rng(seed)))


def served_texts(source: str) -> tuple[list[str], str, str]:
    """(texts, sha256, label) of served text: a workload's eval split, or a file."""
    if workloads.is_workload(source):
        workload = workloads.get_workload(source)
        return workload.texts("eval"), workload.split_info("eval")["sha256"], f"{source}:eval"
    texts, _, digest, label = corpus_texts(source)
    return texts, digest, label


def corpus_texts(source: str) -> tuple[list[str], list[str] | None, str, str]:
    """(calibration texts, held-out texts or None, sha256, label) for a file path or a workload name."""
    path = Path(source)
    if path.is_file():
        return read_corpus(path), None, sha256_file(path), path.name

    if workloads.is_workload(source):
        workload = workloads.get_workload(source)
        info = workload.split_info("calib")
        return workload.texts("calib"), workload.texts("eval"), info["sha256"], f"{source}:calib"
    raise QtcError(f"calibration data not found: {source} (a file, a folder of .npz, or a workload name)")


def text_feed(tokens: np.ndarray, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Feeds for a token window: ids, and the usual companions (mask of ones, positions, zero token types, an
    empty KV cache)."""
    token_spec = token_input(inputs)
    ids = tokens.reshape(1, -1)
    feed = {}
    for spec in inputs:
        if spec.present is not None:
            feed[spec.name] = empty_past(spec, ids.shape[1])
        elif spec.name == token_spec.name:
            feed[spec.name] = ids.astype(spec.dtype)
        elif "mask" in spec.name:
            feed[spec.name] = np.ones_like(ids, dtype=spec.dtype)
        elif "position" in spec.name:
            feed[spec.name] = np.arange(ids.shape[1], dtype=spec.dtype).reshape(1, -1)
        elif "type" in spec.name:
            feed[spec.name] = np.zeros_like(ids, dtype=spec.dtype)
        else:
            raise QtcError(f"model input {spec.name!r} cannot be fed from text: calibrate with .npz files instead")
    return feed


def decode_steps(window: dict[str, np.ndarray], inputs: list[InputSpec], run, steps: int = DECODE_STEPS):
    """What a KV-cache decoder sees when it generates, from one token window: a prefill of all but the last
    `steps` tokens (empty past), then one-token decode steps, each fed the model's own present cache from the run
    before. Yields (feed, outputs) per run; `run(feed)` returns a dict holding every present output."""
    for feed, outputs, _, _ in _group_runs([window], inputs, run, steps):
        yield feed, outputs


def window_runs(windows: Iterable[dict[str, np.ndarray]], inputs: list[InputSpec], run,
                steps: int = DECODE_STEPS, batch: int = DECODE_BATCH) -> Iterator[tuple[dict, dict, str, int]]:
    """decode_steps over a calibration set's windows, `batch` windows of one length at a time: their prefills one
    by one, then each decode step of all of them as one run, fed their caches stacked (a one-token step reads every
    weight for one token: alone, 4 steps cost a quarter of a 252-token prefill on gemma-3-270m; 8 windows' in one run
    read them once). Yields (feed, outputs, kind, windows finished by this run) per run; kind is "prefill",
    "first step" (its pasts: the presents of the prefills before it, stacked) or "step" (the run before's)."""
    for group in _same_length(windows, inputs, batch):
        yield from _group_runs(group, inputs, run, steps)


def _same_length(windows: Iterable[dict[str, np.ndarray]], inputs: list[InputSpec], batch: int):
    token, group = token_input(inputs).name, []
    for window in windows:
        if group and (len(group) == batch or window[token].shape != group[0][token].shape):
            yield group
            group = []
        group.append(window)
    if group:
        yield group


def _group_runs(group: list[dict[str, np.ndarray]], inputs: list[InputSpec], run, steps: int):
    token = token_input(inputs).name
    ids = np.concatenate([window[token] for window in group])
    length = ids.shape[1]
    steps = min(steps, length - 1)
    presents = [spec.present for spec in inputs if spec.present is not None]
    prefills = []
    for window in group:
        feed = text_feed(window[token][0, : length - steps], inputs)
        outputs = run(feed)
        yield feed, outputs, "prefill", 0 if steps else 1
        prefills.append((feed, {name: outputs[name] for name in presents}))
    if not steps:
        return
    feed = {name: np.concatenate([f[name] for f, _ in prefills]) for name in prefills[0][0]}
    outputs = {name: np.concatenate([o[name] for _, o in prefills]) for name in presents}
    del prefills
    for position in range(length - steps, length):
        feed = next_step_feed(feed, outputs, ids[:, position : position + 1], position, inputs)
        outputs = run(feed)
        last = position == length - 1
        yield feed, outputs, "first step" if position == length - steps else "step", len(group) if last else 0


def next_step_feed(feed: dict, outputs: dict, tokens: np.ndarray, position: int, inputs: list[InputSpec]) -> dict:
    """The feed that continues a run: the new tokens [batch, n] from `position` on, the caches the last run returned."""
    step, token_name, (batch, count) = {}, token_input(inputs).name, tokens.shape
    for spec in inputs:
        if spec.present is not None:
            step[spec.name] = fit_past(spec, outputs[spec.present], position, count)
        elif spec.name == token_name:
            step[spec.name] = tokens.astype(spec.dtype)
        elif "mask" in spec.name:  # attention masks cover past + new tokens
            step[spec.name] = np.ones((batch, position + count), dtype=spec.dtype)
        elif "position" in spec.name:
            step[spec.name] = np.repeat(np.arange(position, position + count, dtype=spec.dtype)[None], batch, axis=0)
        else:  # e.g. token types: the last value, once per new token
            step[spec.name] = np.repeat(feed[spec.name][:, -1:], count, axis=1)
    return step


def token_input(inputs: list[InputSpec]) -> InputSpec:
    for spec in inputs:
        if spec.name in _TOKEN_INPUTS:
            return spec
    integer = [s for s in inputs if np.issubdtype(s.dtype, np.integer) and s.rank in (2, None)]
    if not integer:
        raise QtcError("text calibration needs an integer token input (e.g. input_ids); this model has none")
    return integer[0]


def embedding_rows(model: ir.Model) -> int | None:
    """Rows of the table the token input indexes (through a Gather), if there is one."""
    token_name = token_input(model_inputs(model)).name
    for node in model.graph:
        table = node.inputs[0] if node.op_type == "Gather" else None
        if table is not None and table.const_value is not None and node.inputs[1].name == token_name:
            return table.const_value.shape[0]
    return None


def check_vocabulary(model: ir.Model, vocab_size: int | None, tokenizer_name: str | None) -> None:
    """A tokenizer with more tokens than the embedding has rows would index past the table at run time."""
    rows = embedding_rows(model) if vocab_size is not None else None
    if rows is not None and vocab_size > rows:
        raise QtcError(f"tokenizer {tokenizer_name} has {vocab_size} tokens but the model's embedding has {rows} rows")


# ---------------------------------------------------------------------------------------------- npz


def npz_calibration(source: Path, n_samples: int | None, seed: int) -> CalibrationSet:
    """One .npz file per sample (named input tensors); a folder holds many. The last 10 % are held out."""
    files = sorted(source.glob("*.npz")) if source.is_dir() else [source]
    if not files:
        raise QtcError(f"no .npz files in {source}")
    n_heldout = max(1, int(len(files) * HELDOUT_FRACTION)) if len(files) > 1 else 0
    calib_files, heldout_files = files[: len(files) - n_heldout], files[len(files) - n_heldout :]
    if n_samples is not None:
        calib_files = calib_files[:n_samples]
    digest = _hash_files(files)
    return CalibrationSet(
        source=source.name,
        kind="npz",
        sha256=digest,
        seq_len=None,
        seed=seed,
        calib_samples=calib_files,
        heldout_samples=heldout_files,
    )


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def npz_feed(path: Path, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise QtcError(f"{path.name} is not a readable .npz file ({exc})") from None
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise QtcError(f"{path.name} lacks model input {missing[0]!r} (has: {', '.join(sorted(arrays))})")
    feed = {s.name: arrays[s.name].astype(s.dtype, copy=False) for s in inputs}
    # a prefill saved for the source (empty pasts) also feeds the fused graph, whose windowed caches take buffers
    return prefill_for(inputs, feed) if any(spec.capacity for spec in inputs) else feed


def load_calibration(
    source: str | Path,
    *,
    tokenizer: Path | None,
    n_samples: int,
    seq_len: int,
    seed: int,
) -> CalibrationSet:
    """Dispatch on the source: .npz file or folder -> tensors; anything else -> text (file or workload)."""
    path = Path(source)
    if path.suffix == ".npz" or path.is_dir():
        if not path.exists():
            raise QtcError(f"calibration data not found: {path}")
        return npz_calibration(path, n_samples, seed)
    if not path.is_file():
        corpus_texts(str(source))  # raises the right error for a missing file or unknown workload
    if tokenizer is None:
        raise QtcError("text calibration needs a tokenizer: pass --tokenizer tokenizer.json")
    return text_calibration(str(source), tokenizer, n_samples, seq_len, seed)
