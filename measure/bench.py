"""`qtc bench`: a decoder as a server runs it, beside its float baseline, on zh-news prompts.

Speed (batch 1, ORT CPU, the KV-cache feed loop of measure/generate.py): time to first token for a `prompt_len`
token prompt, decode tokens/s over `new_tokens` steps; the models run round by round in one process (model A, B,
A, B, ...) so that a busy machine slows them alike, and each figure is the median over rounds. Peak RSS: of a
fresh process that loads the model and generates (the server's footprint, not this process's). Bytes: the
model's files on disk.

Agreement (decode level, what users see): over `prompts` zh-news eval paragraphs, each cut to its first
`prompt_tokens` tokens, the first `agree_tokens` greedy tokens of model and baseline; the share of prompts whose
tokens are all identical and the mean position of the first divergence (`agree_tokens` when none), each with a
seeded 95 % bootstrap interval over prompts.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from qtc.calibration.data import bos_id, load_tokenizer, tokenizer_beside
from qtc.calibration.workloads import get_workload
from qtc.errors import QtcError
from qtc.frontends.onnx_file import file_bytes, load_model
from qtc.measure.generate import Decoder
from qtc.measure.stats import estimate
from qtc.util.progress import progress_bar

PROMPT_WORKLOAD = "zh-news"


def prompts(tokenizer, n: int, length: int, split: str = "eval") -> list[list[int]]:
    """The first `length` tokens (BOS first) of the first `n` zh-news paragraphs long enough to give them."""
    bos = bos_id(tokenizer)
    found = []
    for text in get_workload(PROMPT_WORKLOAD).texts(split):
        ids = [*([bos] if bos is not None else []), *tokenizer.encode(text, add_special_tokens=False).ids]
        if len(ids) >= length:
            found.append(ids[:length])
        if len(found) == n:
            return found
    raise QtcError(f"{PROMPT_WORKLOAD}:{split} has only {len(found)} paragraphs of >= {length} tokens (asked {n})")


def model_bytes(path: Path) -> int:
    return file_bytes(path, load_model(path))


def agreement(model: list[list[int]], baseline: list[list[int]], seed: int = 0) -> dict:
    """Share of identical greedy continuations and mean first-divergence position, with bootstrap intervals."""
    first = np.array([next((i for i, (a, b) in enumerate(zip(m, r)) if a != b), len(r)) for m, r in zip(model, baseline)],
                     dtype=np.float64)
    same = (first == np.array([len(r) for r in baseline])).astype(np.float64)
    mean = lambda c: c["x"].mean(axis=1)  # noqa: E731
    return {"identical": estimate({"x": same}, mean, seed=seed), "first_divergence": estimate({"x": first}, mean, seed=seed)}


def peak_rss(model: Path, prompt_len: int, new_tokens: int) -> int:
    """Peak RSS (bytes) of a fresh process that loads `model` and generates once (`python -m qtc.measure.generate`)."""
    probe = subprocess.run([sys.executable, "-m", "qtc.measure.generate", str(model), str(prompt_len), str(new_tokens)],
                           capture_output=True, text=True, timeout=1800)
    if probe.returncode != 0:
        raise QtcError(f"{model.name}: the memory probe failed: {probe.stderr.strip().splitlines()[-1:]}")
    return int(json.loads(probe.stdout)["peak_rss_bytes"])


def bench(model: str | Path, baseline: str | Path | None = None, *, prompt_len: int = 256, new_tokens: int = 32,
          rounds: int = 5, n_prompts: int = 50, agree_tokens: int = 32, target: str = "cpu", quiet: bool = False,
          seed: int = 0) -> dict:
    models = [Path(model)] + ([Path(baseline)] if baseline else [])
    if rounds < 1 or n_prompts < 1 or new_tokens < 2 or agree_tokens < 1 or prompt_len < 1:
        raise QtcError("--rounds, --prompts and --agree-tokens must be >= 1, --new-tokens >= 2, --prompt-len >= 1")
    tokenizer_path = tokenizer_beside(models[0]) or (tokenizer_beside(models[-1]))
    if tokenizer_path is None:
        raise QtcError(f"no tokenizer.json beside {models[0].name} to make zh-news prompts with")
    words = load_tokenizer(tokenizer_path)
    decoders = [Decoder(path, target) for path in models]
    timed = prompts(words, 1, prompt_len)[0]
    runs: dict[int, list] = {i: [] for i in range(len(models))}
    for decoder in decoders:  # warm-up: first runs allocate and pre-pack
        decoder.generate(timed, new_tokens)
    with progress_bar("timing", total=rounds * len(models), quiet=quiet) as advance:
        for _ in range(rounds):
            for i, decoder in enumerate(decoders):
                runs[i].append(decoder.generate(timed, new_tokens))
                advance()
    rows = []
    agree_prompts = prompts(words, n_prompts, min(prompt_len, 64)) if baseline else []
    continuations = {}
    with progress_bar("greedy agreement", total=len(agree_prompts) * len(models), quiet=quiet) as advance:
        for i, decoder in enumerate(decoders):  # nothing to agree with without a baseline
            continuations[i] = []
            for prompt in agree_prompts:
                continuations[i].append(decoder.generate(prompt, agree_tokens).tokens)
                advance()
    for i, path in enumerate(models):
        timing = runs[i]
        row = {"model": f"{path.parent.name}/{path.name}", "path": str(path), "bytes": model_bytes(path), "kv_cache": bool(decoders[i].presents),
               "ttft_ms": statistics.median(g.ttft_s for g in timing) * 1e3,
               "decode_tokens_per_s": statistics.median(g.decode_tokens_per_s for g in timing),
               "peak_rss_bytes": peak_rss(path, prompt_len, new_tokens)}
        if baseline and i == 0:
            row["agreement"] = agreement(continuations[0], continuations[1], seed=seed)
            base = runs[1]
            # paired: round by round ratios to the baseline, then the median
            row["ttft_vs_baseline"] = statistics.median(a.ttft_s / b.ttft_s for a, b in zip(timing, base))
            row["decode_speed_vs_baseline"] = statistics.median(
                a.decode_tokens_per_s / b.decode_tokens_per_s for a, b in zip(timing, base))
        rows.append(row)
    return {"rows": rows, "protocol": {"prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
                                       "prompts": n_prompts, "agree_tokens": agree_tokens, "agree_prompt_len": min(prompt_len, 64),
                                       "workload": f"{PROMPT_WORKLOAD}:eval", "target": target, "batch": 1}}
