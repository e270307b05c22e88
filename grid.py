"""`qtc table`: a recipe x calibration grid on one model, each cell a compile and an evaluation, run in this
process or as Ray tasks (`--ray auto|ADDRESS`, the optional `ray` extra).

A cell writes PREFIX.cells/<recipe>@<calib>/ (model.onnx and its files, result.json). result.json is written
last and atomically, with a key over everything that decides the cell (source sha256, recipe, calibration, samples,
seq_len, seed, task, limit, qtc version): a cell whose result.json carries the same key is not computed again, so
an interrupted grid resumes where it stopped, and a worker lost mid-cell (Ray retries the task) redoes only its own
cell. A cell that fails for a reason qtc can name (a QtcError) records that one line and the grid goes on.
Compiles and evaluations are seeded: the same grid gives the same JSON in-process and on Ray, cell for cell.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qtc.api import compile as compile_model
from qtc.errors import QtcError
from qtc.measure.evaluation import evaluate
from qtc.recipes import load_recipe
from qtc.util.cache import sha256_file, sha256_text
from qtc.util.distribute import run_jobs
from qtc.util.files import write_json_atomic, write_text_atomic
from qtc.util.version import __version__

RESULT = "result.json"
MODEL = "model.onnx"


@dataclass(frozen=True)
class Cell:
    """One grid cell: everything that decides its result."""

    source: str
    source_sha256: str
    recipe: str
    calib: str
    samples: int
    seq_len: int
    seed: int
    task: str
    limit: int | None

    @property
    def name(self) -> str:
        return f"{Path(self.recipe).stem}@{Path(self.calib).name}"

    @property
    def key(self) -> str:
        return sha256_text(json.dumps({**asdict(self), "source": None, "qtc": __version__}, sort_keys=True))


def cells_of(model: Path, recipes: list[str], calibs: list[str], samples: int, seq_len: int, seed: int, task: str,
             limit: int | None) -> list[Cell]:
    if not model.is_file():
        raise QtcError(f"model not found: {model}")
    if not recipes or not calibs:
        raise QtcError("qtc table needs at least one recipe (--recipes) and one calibration set (--calib)")
    for recipe in recipes:
        load_recipe(recipe)  # an unknown recipe fails now, not in a worker minutes later
    digest = sha256_file(model)
    return [Cell(str(model.resolve()), digest, recipe, calib, samples, seq_len, seed, task, limit)
            for calib in calibs for recipe in recipes]


def load_done(folder: Path, cell: Cell) -> dict | None:
    """The cell's stored result when it was computed with the same key."""
    try:
        stored = json.loads((folder / RESULT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored if stored.get("key") == cell.key else None


def run_cell(cell: Cell, folder: str) -> dict:
    """Compile and evaluate one cell into `folder` (computed afresh); returns and stores its result."""
    out = Path(folder)
    if out.exists():
        shutil.rmtree(out)  # a partial cell from a lost worker: start it clean
    started = time.perf_counter()
    result = {"cell": cell.name, "key": cell.key, **asdict(cell)}
    try:
        compiled = compile_model(cell.source, recipe=cell.recipe, calib=cell.calib, samples=cell.samples,
                                 seq_len=cell.seq_len, seed=cell.seed, compare=False, quiet=True)
        compiled.save(out / MODEL)
        scored = evaluate(out / MODEL, cell.task, baseline=cell.source, limit=cell.limit, quiet=True)
        result |= {"bytes": compiled.report["output"]["bytes"], "model_sha256": sha256_file(out / MODEL),
                   "data_sha256": _data_sha(out / MODEL), "metrics": scored["metrics"]}
    except QtcError as exc:  # a real reason, in one line: the grid reports it and goes on
        out.mkdir(parents=True, exist_ok=True)
        result["error"] = " ".join(str(exc).split())
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out / RESULT, result)
    return result


def _data_sha(model: Path) -> str | None:
    data = model.with_name(model.name + ".data")
    return sha256_file(data) if data.is_file() else None


def run_grid(cells: list[Cell], prefix: Path, ray_address: str | None = None, cpus_per_cell: float = 1.0,
             report=lambda status: None, memory_per_cell: int | None = None, gpus_per_cell: float = 0) -> list[dict]:
    """Every cell's result, in grid order: cells already done are read back, the others computed in this process
    or as Ray tasks. `report(status)` is called as cells finish (done, running, failed, total, eta_s)."""
    folder = Path(f"{prefix}.cells")
    results = {cell.name: load_done(folder / cell.name, cell) for cell in cells}
    pending = [cell for cell in cells if results[cell.name] is None]
    results = {name: result for name, result in results.items() if result is not None}
    started, computed = time.perf_counter(), [0]

    def finished(name: str, result: dict, running: int) -> None:
        results[name] = result
        computed[0] += 1
        per_cell = (time.perf_counter() - started) / computed[0]  # wall time per finished cell, parallelism included
        report({"done": len(results), "running": running, "failed": sum("error" in r for r in results.values()),
                "total": len(cells), "eta_s": round(per_cell * (len(cells) - len(results)), 1)})

    report({"done": len(results), "running": 0, "failed": sum("error" in r for r in results.values()),
            "total": len(cells), "eta_s": None})
    resources = {"num_cpus": cpus_per_cell, "num_gpus": gpus_per_cell, "memory": memory_per_cell}
    jobs = [(cell, str(folder / cell.name)) for cell in pending]
    for index, result, running in run_jobs(run_cell, jobs, ray_address, resources):
        finished(pending[index].name, result, running)
    return [results[cell.name] for cell in cells]


def _cell_row(r: dict) -> str:
    metrics = r.get("metrics") or {}
    delta, kl, top1 = (metrics.get(k) for k in ("delta_bits_per_char", "kl_per_token", "top1_agreement"))
    cols = [Path(r["recipe"]).stem, r["calib"],
            f"{delta['value']:+.4f} [{delta['ci95'][0]:+.4f}, {delta['ci95'][1]:+.4f}]" if delta else "-",
            f"{kl['value']:.4f}" if kl else "-", f"{top1['value']:.2%}" if top1 else "-",
            f"{r['bytes'] / 1e6:,.1f}" if "bytes" in r else "-", r.get("error", "")]
    return "| " + " | ".join(cols) + " |"


def write_table(results: list[dict], prefix: Path, title: str) -> dict:
    """PREFIX.json (the cells without their timings, sorted keys: equal for equal grids), PREFIX.md (the table)
    and PREFIX.png (size vs Δ bits/char, one colour per calibration set)."""
    summary = {"model": title, "cells": [{k: v for k, v in r.items() if k != "seconds"} for r in results]}
    write_json_atomic(Path(f"{prefix}.json"), summary)
    lines = [f"# {title}: recipes x calibration", "",
             "| recipe | calibration | Δ bits/char vs float [95% CI] | KL / token | top-1 | MB | error |",
             "|---|---|---:|---:|---:|---:|---|", *map(_cell_row, results)]
    write_text_atomic(Path(f"{prefix}.md"), "\n".join(lines) + "\n")
    _plot(results, Path(f"{prefix}.png"), title)
    return summary


def _plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415 - optional extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for calib in sorted({r["calib"] for r in results}):
        points = [(r["bytes"] / 1e6, r["metrics"]["delta_bits_per_char"]["value"], Path(r["recipe"]).stem)
                  for r in results if r["calib"] == calib and "metrics" in r and "delta_bits_per_char" in r["metrics"]]
        if not points:
            continue
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=f"calibrated on {calib}")
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="MB on disk", ylabel="Δ bits/char vs float (lower is better)", title=f"{title}: size vs accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
