"""`qtc sweep`: measure a layer-skip model at several budgets: task metric with its interval, ORT CPU latency,
realized sparsity; next to each, the static one-shot ShortGPT table (whole blocks by Block Influence, recorded
at compile time) at the same budget, fed to the same session through the model's `qtc_skip_table` input.
Writes JSON and a PNG of the metric-vs-latency Pareto front.

Latency: batch 1, `seq_len` tokens, one session per configuration, runs interleaved across configurations (so
that a busy machine slows them all alike), median of `runs` after `warmup`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from qtc.backends import get_backend
from qtc.backends.base import session_threads
from qtc.calibration.data import InputSpec, embedding_rows, model_inputs, text_feed, tokenizer_beside
from qtc.frontends.onnx_file import load_model
from qtc.measure.evaluation import evaluate
from qtc.measure.generate import Decoder
from qtc.passes.layerskip import BUDGET_INPUT, TABLE, level_of, skip_plan, sparsity
from qtc.util.distribute import run_jobs
from qtc.util.files import write_json_atomic

LOWER_IS_BETTER = {"bits_per_char": True, "perplexity": True, "accuracy": False, "cosine_to_baseline": False}


def _sparsity(plan: dict, row: list[bool]) -> dict:
    skipped = [name for name, skip in zip(plan["branches"], row) if skip]
    return {"skipped": skipped, **sparsity(plan["costs"], {i for i, skip in enumerate(row) if skip})}


def _latencies(sessions: dict[str, tuple], seq_len: int, runs: int, warmup: int, seed: int) -> dict[str, float]:
    """Median ms per configuration, runs interleaved."""
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {key: [] for key in sessions}
    # A fixed random order per round: no configuration always runs right after the same other one.
    keys = sorted(sessions)
    for step in range(warmup + runs):
        for key in [keys[i] for i in rng.permutation(len(keys))]:
            session, feed_for = sessions[key]
            feed = feed_for(np.random.default_rng(seed + step), seq_len)
            started = time.perf_counter()
            session.run(None, feed)
            if step >= warmup:
                times[key].append((time.perf_counter() - started) * 1e3)
    return {key: float(np.median(values)) for key, values in times.items()}


def _feeder(inputs: list[InputSpec], vocab: int, extra: dict[str, np.ndarray]):
    """Random token windows fed as text is (mask, positions, an empty KV cache), plus the budget inputs."""

    def feed(rng, seq_len):
        return text_feed(rng.integers(0, vocab, size=seq_len, dtype=np.int64), inputs) | extra

    return feed


def _decode_speed(path: Path, extra: dict[str, np.ndarray], seq_len: int, runs: int, vocab: int, seed: int) -> dict:
    """A KV decoder at a fixed budget: median TTFT (a `seq_len` prompt) and decode tokens/s over 16 steps."""
    decoder = Decoder(path, extra=extra)
    prompt = [int(t) for t in np.random.default_rng(seed).integers(0, vocab, size=seq_len)]
    decoder.generate(prompt, 4)  # warm-up
    timed = [decoder.generate(prompt, 16) for _ in range(max(runs // 4, 3))]
    return {"ttft_ms": round(float(np.median([g.ttft_s for g in timed])) * 1e3, 3),
            "decode_tokens_per_s": round(float(np.median([g.decode_tokens_per_s for g in timed])), 2)}


def _configurations(plans: dict, budgets: list[float]):
    """(path, method, budget, level, table, run-time feeds, scoring key) of every row a sweep measures; two budgets
    on one level (or equal rows) run the same graph, so share one scoring key."""
    for path, plan in plans.items():
        for method, table in (("qtc", plan["table"]), ("static-shortgpt", plan["static"])):
            for budget in budgets:
                level = level_of(plan["levels"], budget)
                if method != "qtc" and not any(table[level]):
                    continue  # the static table skips nothing here: the dense model, measured as qtc's row
                feeds = {BUDGET_INPUT: np.array(budget, dtype=np.float32), TABLE: np.array(table, dtype=np.bool_)}
                yield path, method, budget, level, table, feeds, (path, tuple(table[level]))


def _score(path: Path, task: str, baseline, limit, seed: int, tokenizer, feeds: dict) -> dict:
    return evaluate(path, task, baseline=baseline, limit=limit, seed=seed, quiet=True, tokenizer=tokenizer, feeds=feeds)


def sweep(models: list[Path], budgets: list[float], task: str, *, baseline: Path | None = None, limit: int | None = None,
          runs: int = 20, warmup: int = 3, seq_len: int = 256, seed: int = 0, tokenizer: Path | None = None,
          quiet: bool = False, ray_address: str | None = None) -> dict:
    """Every model x budget, qtc's table and the static ShortGPT one: metric (interval), latency, sparsity.

    With `ray_address` the scorings (one per distinct gated graph) run as Ray tasks; latencies never do: they are
    paired rounds of every configuration on this one machine, or they would compare machines, not budgets."""
    plans = {path: skip_plan(path) for path in models}
    backend = get_backend("cpu")
    rows, sessions, scored = [], {}, {}
    if ray_address is not None:
        jobs, keys = [], []
        for path, _, _, _, _, feeds, same in _configurations(plans, budgets):
            if same not in keys:
                keys.append(same)
                jobs.append((path, task, baseline, limit, seed, tokenizer or tokenizer_beside(path), feeds))
        scored = {keys[index]: result for index, result, _ in run_jobs(_score, jobs, ray_address)}
    for path, plan in plans.items():
        session = backend.session(path)
        inputs = model_inputs(load_model(path))
        vocab = _vocabulary(path)
        words = tokenizer or tokenizer_beside(path)
        for _, method, budget, level, table, feeds, same in _configurations({path: plan}, budgets):
            if same not in scored:
                scored[same] = evaluate(path, task, baseline=baseline, limit=limit, seed=seed, quiet=quiet,
                                        tokenizer=words, feeds=feeds)
            key = f"{path.name}|{method}|{budget}"
            sessions[key] = (session, _feeder(inputs, vocab, feeds))
            rows.append({"model": path.name, "method": method, "budget": budget, "level": plan["levels"][level],
                         **_sparsity(plan, table[level]), "metrics": scored[same]["metrics"], "key": key,
                         "data": scored[same]["data"]})
            if any(spec.present for spec in inputs):  # a KV decoder: what a server sees at this budget
                rows[-1]["decode"] = _decode_speed(path, feeds, seq_len, runs, vocab, seed)
    latency = _latencies(sessions, seq_len, runs, warmup, seed)
    for row in rows:
        row["latency_ms"] = round(latency[row.pop("key")], 3)
    for row in rows:
        dense = next((r for r in rows if r["model"] == row["model"] and r["method"] == "qtc" and r["level"] == 1.0), None)
        row["latency_vs_dense"] = round(row["latency_ms"] / dense["latency_ms"], 4) if dense else None
    metric = next(iter(rows[0]["metrics"])) if rows else None
    return {"task": task, "metric": metric, "lower_is_better": LOWER_IS_BETTER.get(metric, True),
            "baseline": baseline.name if baseline else None, "limit": limit,
            "latency": {"backend": "cpu", "batch": 1, "seq_len": seq_len, "runs": runs, "warmup": warmup,
                        "statistic": "median", "threads": session_threads()},
            "tables": {p.name: {"levels": plan["levels"], "branches": plan["branches"], "metric": plan["metric"]}
                       for p, plan in plans.items()},
            "rows": rows, "pareto": pareto(rows, metric, LOWER_IS_BETTER.get(metric, True))}


def _vocabulary(path: Path) -> int:
    return embedding_rows(load_model(path)) or 2


def pareto(rows: list[dict], metric: str, lower_is_better: bool) -> list[int]:
    """Indices of rows no other row beats on both latency and the metric."""
    sign = 1 if lower_is_better else -1
    points = [(r["latency_ms"], sign * r["metrics"][metric]["value"]) for r in rows]
    return [i for i, (t, m) in enumerate(points)
            if not any(t2 <= t and m2 <= m and (t2, m2) != (t, m) for t2, m2 in points)]


def plot(result: dict, path: Path) -> Path:
    """Metric (95 % interval) vs latency: each model's qtc budgets joined, static points apart, Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    # Against a float baseline the paired delta is the sharp comparison (shared paragraph difficulty cancels).
    metric = f"delta_{result['metric']}" if rows and f"delta_{result['metric']}" in rows[0]["metrics"] else result["metric"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for m, model in enumerate(sorted({r["model"] for r in rows})):
        for method, marker, style in (("qtc", "o", "-"), ("static-shortgpt", "s", ":")):
            mine = sorted((r for r in rows if r["model"] == model and r["method"] == method), key=lambda r: -r["budget"])
            if not mine:
                continue
            x = [r["latency_ms"] for r in mine]
            y = [r["metrics"][metric]["value"] for r in mine]
            err = np.array([[v - r["metrics"][metric]["ci95"][0], r["metrics"][metric]["ci95"][1] - v]
                            for v, r in zip(y, mine)]).T
            ax.errorbar(x, y, yerr=err, marker=marker, linestyle=style, color=f"C{m}", capsize=3,
                        label=f"{model} {method}", mfc="white" if method != "qtc" else None)
            for r, xi, yi in zip(mine, x, y):
                ax.annotate(f"{r['budget']:g} ({len(r['skipped'])})", (xi, yi), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=f"C{m}")
    front = sorted((rows[i] for i in pareto(rows, metric, result["lower_is_better"])), key=lambda r: r["latency_ms"])
    ax.step([r["latency_ms"] for r in front], [r["metrics"][metric]["value"] for r in front], where="post",
            color="black", alpha=0.5, linewidth=2, label="Pareto front")
    ax.set_xlabel(f"ORT CPU latency, ms (batch 1, {result['latency']['seq_len']} tokens, median of {result['latency']['runs']})")
    versus = f" vs {result['baseline']}" if metric.startswith("delta_") else ""
    ax.set_ylabel(f"{metric.replace('_', ' ')}{versus} ({'lower' if result['lower_is_better'] else 'higher'} is better), "
                  "95 % CI", fontsize=9)
    ax.set_title(f"{result['task']}: budget sweep; labels: budget (branches skipped)\n"
                 "filled: qtc calibrated table, open: static one-shot ShortGPT blocks", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write(result: dict, prefix: Path) -> tuple[Path, Path]:
    json_path, png_path = prefix.with_suffix(".json"), prefix.with_suffix(".png")
    write_json_atomic(json_path, result)
    plot(result, png_path)
    return json_path, png_path
