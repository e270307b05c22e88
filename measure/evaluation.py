"""`qtc eval`: score a model on a Chinese workload task, optionally against a baseline, with paired intervals."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qtc.backends import get_backend
from qtc.calibration.data import (
    check_vocabulary,
    load_tokenizer,
    model_inputs,
    tokenizer_beside,
)
from qtc.calibration.workloads import get_workload
from qtc.errors import QtcError
from qtc.frontends.onnx_file import load_model
from qtc.measure.stats import estimate
from qtc.measure.tasks import Runner, Task, get_task
from qtc.util.progress import progress_bar

DEFAULT_MAX_LEN = 512


def _runner(backend, path: Path, output: str, tokenizer, extra: dict | None = None) -> tuple[Runner, dict]:
    model = load_model(path)  # validates the file and its external data before ORT sees it
    names = [v.name for v in model.graph.outputs]
    if output not in names:
        raise _task_error(path, output, names)
    check_vocabulary(model, tokenizer.get_vocab_size(), "of the evaluated model")
    optional = {v.name for v in model.graph.inputs if v.is_initializer()}
    unknown = sorted(set(extra or {}) - optional)
    if unknown:
        raise QtcError(f"{path.name} has no input {unknown[0]!r} with a default to set")
    runner = Runner(backend.session(path), model_inputs(model), output, dict(extra or {}))
    return runner, dict(sorted(model.metadata_props.items()))


def _task_error(path: Path, output: str, names: list[str]):
    return QtcError(f"{path.name} has no output {output!r} for this task (outputs: {', '.join(names)})")


def _tokenizer_for(path: Path, tokenizer: str | os.PathLike | None, baseline: Path | None):
    """--tokenizer, else the tokenizer.json beside the model, else the one beside the baseline."""
    if tokenizer:
        return load_tokenizer(Path(tokenizer))
    own = tokenizer_beside(path) or tokenizer_beside(baseline)
    if own is not None:
        return load_tokenizer(own)
    raise QtcError(f"no tokenizer: pass --tokenizer, or put tokenizer.json beside {path.name}")


def _metrics(task: Task, columns: dict[str, np.ndarray], seed: int) -> dict:
    """Point estimates with 95 % bootstrap intervals; deltas are paired (same resampled units)."""
    if task.name == "zh-news-ppl":
        metrics = {
            "bits_per_char": estimate(columns, lambda c: c["nll_bits"].sum(1) / c["chars"].sum(1), seed=seed),
            "perplexity": estimate(columns, lambda c: np.exp2(c["nll_bits"].sum(1) / c["tokens"].sum(1)), seed=seed),
        }
        if "base_nll_bits" in columns:
            metrics["baseline_bits_per_char"] = estimate(columns, lambda c: c["base_nll_bits"].sum(1) / c["chars"].sum(1), seed=seed)
            metrics["delta_bits_per_char"] = estimate(
                columns, lambda c: (c["nll_bits"].sum(1) - c["base_nll_bits"].sum(1)) / c["chars"].sum(1), seed=seed)
            metrics["kl_per_token"] = estimate(columns, lambda c: c["kl_nats"].sum(1) / c["tokens"].sum(1), seed=seed)
            metrics["top1_agreement"] = estimate(columns, lambda c: c["top1_same"].sum(1) / c["tokens"].sum(1), seed=seed)
        return metrics
    if task.name == "zh-reviews-acc":
        metrics = {"accuracy": estimate(columns, lambda c: c["correct"].mean(1), seed=seed)}
        if "base_correct" in columns:
            metrics["baseline_accuracy"] = estimate(columns, lambda c: c["base_correct"].mean(1), seed=seed)
            metrics["delta_accuracy"] = estimate(columns, lambda c: c["correct"].mean(1) - c["base_correct"].mean(1), seed=seed)
        return metrics
    return {"cosine_to_baseline": estimate(columns, lambda c: c["cosine"].mean(1), seed=seed),
            "min_cosine": {"value": float(columns["cosine"].min()), "n": len(columns["cosine"])}}


def evaluate(
    model: str | os.PathLike,
    task: str,
    *,
    baseline: str | os.PathLike | None = None,
    backend: str = "cpu",
    limit: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    seed: int = 0,
    quiet: bool = False,
    feeds: dict[str, np.ndarray] | None = None,
) -> dict:
    """Score MODEL on TASK (and BASELINE on the same units); returns plain data with provenance echoed."""
    spec = get_task(task)
    path = Path(model)
    engine = get_backend(backend)
    if spec.needs_baseline and baseline is None:
        raise QtcError(f"task {task} compares with a baseline: pass --baseline FLOAT_MODEL")
    baseline = Path(baseline) if baseline else None
    words = _tokenizer_for(path, tokenizer, baseline)
    runner, metadata = _runner(engine, path, spec.output, words, feeds)
    base_runner, base_metadata = _runner(engine, baseline, spec.output, words) if baseline else (None, None)
    workload = get_workload(spec.workload)
    units = spec.units(workload)[: limit or None]
    rows = []
    with progress_bar(f"eval {task}", total=len(units), quiet=quiet) as advance:
        for unit in units:
            rows.append(spec.score(runner, base_runner, words, unit, max_len))
            advance()
    columns = {key: np.array([row[key] for row in rows], dtype=np.float64) for key in rows[0]} if rows else {}
    return {
        "task": task,
        "description": spec.description,
        "data": workload.split_info(spec.split) | {"units_scored": len(units), "limit": limit},
        "backend": backend,
        "seed": seed,
        "model": {"file": path.name, "metadata": metadata},
        "baseline": {"file": Path(baseline).name, "metadata": base_metadata} if baseline else None,
        "metrics": _metrics(spec, columns, seed) if rows else {},
    }
