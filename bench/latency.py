"""ORT CPU prefill latency of the float model and each recipe, and each recipe's compile time.

Every recipe is compiled in its own fresh process (wall time and peak RSS of that process; calibration data
only for recipes that need it: zh-news, --samples x --seq-len tokens, seed 0; no held-out comparison), then
timed in another fresh process: one ORT CPU session with intra_op threads = all cores and the model's own
`qtc.session.*` config entries, batch 1 x --tokens tokens of real zh-news eval text, --warmup runs, then the
median (and p10 / p90) of --runs runs. The kernels column is the op histogram of the graph ORT really runs.

Recipes (--recipes, comma list): float, w8a8, w8a16, w4a16, w4a8, fp8 (the built-ins) and w4a16-float-table
(w4a16 with the embedding table, and a tied head, left in float: what the int8 table costs or saves in time). `--compiled ROW=PATH` times a
model compiled earlier instead of compiling it again (its compile time is then the `compile_seconds` of its
sidecar report, which includes the held-out comparison, and is marked so); ROW may be any label. `--paired R`
then loads every row's model in one process and runs them round by round for R rounds: the per-round ratio to
float (median, bootstrap 95 % interval) holds on a busy machine, where the fresh-process absolute times do not.

    python bench/latency.py MODEL_ONNX [--recipes ...] [--compiled ROW=PATH ...] [--tokens 256] [--runs 10]
                                       [--warmup 3] [--samples 64] [--seq-len 256] [--out NAME] [--workdir DIR]
                                       [--paired ROUNDS]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (  # noqa: E402
    RESULTS_DIR,
    machine,
    peak_rss_bytes,
    run_worker,
    write_results,
    write_worker_result,
)

NAME = "latency"
WORKLOAD = "zh-news"
RECIPES: dict[str, str | dict] = {
    "w8a8": "w8a8",
    "w8a16": "w8a16",
    "w4a16": "w4a16",
    "w4a16-float-table": {"base": "w4a16", "name": "w4a16-float-table", "embedding": None},
    "w4a8": "w4a8",
    "fp8": "fp8",
}
ROWS = ("float", *RECIPES)
KERNEL_OPS = ("MatMulNBits", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMul",
              "FusedMatMul", "Gemm", "GatherBlockQuantized", "QuantizeLinear", "DequantizeLinear")
SHORT = {"QuantizeLinear": "Q", "DequantizeLinear": "DQ", "GatherBlockQuantized": "GBQ"}


# --------------------------------------------------------------------------------------------- workers


def _recipe(row: str):
    from qtc.recipes import load_recipe, parse_recipe

    spec = RECIPES[row]
    return load_recipe(spec) if isinstance(spec, str) else parse_recipe(spec)


def compile_worker(args) -> dict:
    import qtc

    recipe = _recipe(args.row)
    started = time.perf_counter()
    calib = WORKLOAD if recipe.needs_calibration else None
    result = qtc.compile(args.model, recipe=recipe, calib=calib, samples=args.samples, seq_len=args.seq_len, seed=0,
                         compare=False, quiet=True)
    result.save(args.path)
    return {"compile_seconds": round(time.perf_counter() - started, 2), "peak_rss_bytes": peak_rss_bytes(),
            "calibration": result.report.get("calibration"), "recipe": result.report.get("recipe"),
            "target_notes": result.report.get("target_notes"), "output_bytes": result.report["output"]["bytes"]}


def _tokens(model: Path, count: int):
    """The first `count` tokens of the zh-news eval split, joined paragraph after paragraph (real text)."""
    import numpy as np
    from tokenizers import Tokenizer

    from qtc.calibration.workloads import get_workload

    tokenizer = Tokenizer.from_file(str(model.parent / "tokenizer.json"))
    ids: list[int] = []
    for text in get_workload(WORKLOAD).texts("eval"):
        ids += tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) >= count:
            return np.array(ids[:count], dtype=np.int64)
    raise SystemExit(f"the eval split has fewer than {count} tokens")


def _session(path: Path):
    """An ORT CPU session on all cores with the model's own `qtc.session.*` config entries."""
    import onnxruntime as ort

    from qtc.backends import get_backend
    from qtc.backends.base import session_config

    backend = get_backend("cpu")
    options = backend.session_options()
    options.intra_op_num_threads = os.cpu_count() or 1
    config = session_config(str(path))
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=[backend.provider]), options, config


def _feed(args, path: Path) -> dict:
    from qtc.calibration.data import model_inputs, text_feed
    from qtc.frontends.onnx_file import load_model

    return text_feed(_tokens(Path(args.model), args.tokens), model_inputs(load_model(path)))


def paired_worker(args) -> dict:
    """Every row's model in one process, run round by round (float first in each round): a per-round ratio to
    float cancels load that changes slowly, so the ratios hold on a busy machine where absolute times do not."""
    from fusion_latency import paired_ratio

    paths = dict(item.split("=", 1) for item in args.paths.split(","))
    sessions = {row: _session(Path(path))[0] for row, path in paths.items()}
    feeds = {row: _feed(args, Path(path)) for row, path in paths.items()}
    for row, session in sessions.items():
        for _ in range(args.warmup):
            session.run(None, feeds[row])
    times: dict[str, list[float]] = {row: [] for row in sessions}
    for _ in range(args.runs):
        for row, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds[row])
            times[row].append((time.perf_counter() - started) * 1000)
    return {row: {"median_ms": round(statistics.median(t), 2), "ratio_to_float": paired_ratio(t, times["float"])}
            for row, t in times.items()}


def latency_worker(args) -> dict:
    from qtc.backends import get_backend
    from qtc.frontends.onnx_file import load_model

    backend = get_backend("cpu")
    path = Path(args.path)
    started = time.perf_counter()
    session, options, config = _session(path)
    session_seconds = time.perf_counter() - started
    feed = _feed(args, path)
    for _ in range(args.warmup):
        session.run(None, feed)
    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    ops = backend.runtime_ops(load_model(path))
    return {
        "median_ms": round(statistics.median(times), 2),
        "p10_ms": round(times[len(times) // 10], 2),
        "p90_ms": round(times[-1 - len(times) // 10], 2),
        "min_ms": round(times[0], 2),
        "runs_ms": [round(t, 2) for t in times],
        "session_seconds": round(session_seconds, 2),
        "threads": options.intra_op_num_threads,
        "session_config": config,
        "runtime_ops": ops,
        "peak_rss_bytes": peak_rss_bytes(),
    }


# ---------------------------------------------------------------------------------------------- driver


def kernels(ops: dict | None) -> str:
    counts: dict[str, int] = {}
    for key, n in (ops or {}).items():
        op = key.split("::")[-1]
        if op in KERNEL_OPS:
            counts[SHORT.get(op, op)] = counts.get(SHORT.get(op, op), 0) + n
    return ", ".join(f"{op} {n}" for op, n in counts.items()) or "-"


def markdown(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    float_ms = next((r["latency"]["median_ms"] for r in results["rows"] if r["row"] == "float" and r.get("ok")), None)
    lines = [
        f"# Prefill latency: {results['model']['path']}",
        "",
        f"- ORT CPU {m.get('onnxruntime')}, {m.get('cpus')} cores ({', '.join(m.get('cpu_flags', [])) or '-'}), "
        f"intra_op threads = all cores; batch 1 x {s['tokens']} tokens of zh-news eval text; "
        f"median [p10, p90] of {s['runs']} runs after {s['warmup']} warmup runs, each recipe in a fresh process",
        f"- compile: fresh process per recipe, no held-out comparison; calibration (only where the recipe needs it) "
        f"{WORKLOAD}, {s['samples']} x {s['seq_len']} tokens, seed 0",
        f"- {results.get('note') or 'the machine may be shared: absolute times are upper bounds'}",
        "",
        "| recipe | MB | compile s | compile peak RSS MB | session s | prefill ms [p10, p90] | vs float | "
        "paired time / float [95% CI] | kernels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        if not row.get("ok"):
            lines.append(f"| {row['row']} | FAILED: {row.get('error', '?').splitlines()[-1][:120]} | | | | | | | |")
            continue
        lat, comp = row["latency"], row.get("compile") or {}
        speed = f"{float_ms / lat['median_ms']:.2f}x" if float_ms else "-"
        lines.append(
            f"| {row['row']} | {row['bytes'] / 1e6:.1f} | {comp.get('compile_seconds', '-')} | "
            f"{comp['peak_rss_bytes'] / 1e6:.0f} | " if comp.get("peak_rss_bytes") else
            f"| {row['row']} | {row['bytes'] / 1e6:.1f} | {comp.get('compile_seconds', '-')}"
            f"{' (sidecar)' if comp.get('from_sidecar') else ''} | - | "
        )
        paired = (row.get("paired") or {}).get("ratio_to_float")
        ratio = f"{paired['median']:.3f} [{paired['ci95'][0]:.3f}, {paired['ci95'][1]:.3f}]" if paired else "-"
        lines[-1] += (f"{lat['session_seconds']} | {lat['median_ms']:.1f} [{lat['p10_ms']:.1f}, {lat['p90_ms']:.1f}] | "
                      f"{speed} | {ratio} | {kernels(lat.get('runtime_ops'))} |")
    notes = [f"- {r['row']}: {note}" for r in results["rows"] for note in (r.get("compile") or {}).get("target_notes") or []]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def _bytes(path: Path) -> int:
    from compile_vs_ort import graph_facts

    return graph_facts(path)["bytes_on_disk"]


def _sidecar_compile(path: Path) -> dict:
    """What the compiled model's own report says about its compile (qtc writes OUT-stem.qtc.json beside it)."""
    report = json.loads(path.with_name(path.stem + ".qtc.json").read_text())
    return {"compile_seconds": report.get("compile_seconds"), "from_sidecar": True,
            "calibration": report.get("calibration"), "recipe": report.get("recipe"),
            "target_notes": report.get("target_notes"), "output_bytes": report["output"]["bytes"]}


def run_row(row: str, args, workdir: Path, compiled_path: Path | None = None) -> dict:
    entry: dict = {"row": row}
    script = Path(__file__).resolve()
    common = ["--model", args.model, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
              "--tokens", str(args.tokens), "--runs", str(args.runs), "--warmup", str(args.warmup)]
    path = Path(args.model)
    if compiled_path is not None:
        path = compiled_path
        entry["compile"] = _sidecar_compile(path)
    elif row != "float":
        path = workdir / row / "model.onnx"
        shutil.rmtree(path.parent, ignore_errors=True)
        path.parent.mkdir(parents=True)
        compiled = run_worker(script, ["--worker", "compile", "--row", row, "--path", str(path), *common],
                              workdir / f"{row}.compile.json")
        if not compiled.pop("ok"):
            return entry | {"ok": False, "error": compiled.get("error", "")}
        entry["compile"] = compiled
    timed = run_worker(script, ["--worker", "latency", "--row", row, "--path", str(path), *common],
                       workdir / f"{row}.latency.json")
    if not timed.pop("ok"):
        return entry | {"ok": False, "error": timed.get("error", "")}
    return entry | {"ok": True, "latency": timed, "bytes": _bytes(path), "path": str(path)}


def run_paired(rows: list[dict], args, workdir: Path) -> None:
    """Time every row again, interleaved in one process (paired_worker); adds `paired` to each row."""
    paths = ",".join(f"{r['row']}={r['path']}" for r in rows if r.get("ok"))
    common = ["--model", args.model, "--tokens", str(args.tokens), "--runs", str(args.paired), "--warmup", "1"]
    timed = run_worker(Path(__file__).resolve(), ["--worker", "paired", "--paths", paths, *common], workdir / "paired.json")
    if timed.pop("ok"):
        for row in rows:
            row["paired"] = timed.get(row["row"])
    else:
        print(f"[{NAME}] paired timing FAILED: {timed.get('error', '')[-500:]}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="float ONNX model (tokenizer.json beside it)")
    parser.add_argument("--model", dest="model_opt", help=argparse.SUPPRESS)
    parser.add_argument("--recipes", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--tokens", type=int, default=256, help="prefill length (default 256)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    parser.add_argument("--compiled", action="append", default=[], metavar="ROW=PATH",
                        help="time an already compiled model under the label ROW (repeatable)")
    parser.add_argument("--out", default=None, help="results name: bench/results/latency_NAME.{json,md}")
    parser.add_argument("--note", default=None, help="a line for the table header (e.g. machine contention)")
    parser.add_argument("--workdir", type=Path, default=None, help="compiled models (default: temp, removed)")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS", help="then time all rows again in one "
                        "process, interleaved for ROUNDS rounds, as ratios to float with 95%% intervals (needs float)")
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("compile", "latency", "paired"), help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model_opt or args.model
    if args.worker:
        workers = {"compile": compile_worker, "latency": latency_worker, "paired": paired_worker}
        write_worker_result(args.result, workers[args.worker](args))
        return 0
    if not args.model:
        parser.error("MODEL is required")
    rows = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown recipes: {unknown} (known: {', '.join(ROWS)})")
    compiled = {}
    for item in args.compiled:
        row, _, where = item.partition("=")
        if not where or not Path(where).is_file():
            parser.error(f"--compiled {item!r}: expected ROW=PATH of an existing model")
        compiled[row] = Path(where).resolve()
    rows += [row for row in compiled if row not in rows]
    if args.runs < 10:
        parser.error("--runs must be at least 10 (a median of fewer is noise)")
    if args.paired and "float" not in rows:
        parser.error("--paired times every row against float: include float in --recipes")
    model = Path(args.model).resolve()
    args.model = str(model)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qtc-latency-"))
    workdir.mkdir(parents=True, exist_ok=True)
    name = args.out or model.parent.name
    results = {"benchmark": NAME, "model": {"path": str(model)}, "machine": machine(), "note": args.note,
               "settings": {"tokens": args.tokens, "runs": args.runs, "warmup": args.warmup, "samples": args.samples,
                            "seq_len": args.seq_len, "recipes": rows}, "rows": []}
    try:
        for row in rows:
            print(f"[{NAME}] {row} ...", flush=True)
            entry = run_row(row, args, workdir, compiled.get(row))
            results["rows"].append(entry)
            if entry["ok"]:
                print(f"[{NAME}] {row}: {entry['latency']['median_ms']} ms, compile "
                      f"{(entry.get('compile') or {}).get('compile_seconds', '-')} s", flush=True)
            else:
                print(f"[{NAME}] {row} FAILED: {entry['error'][-500:]}", file=sys.stderr, flush=True)
            write_results(f"{NAME}_{name}", results)
            (RESULTS_DIR / f"{NAME}_{name}.md").write_text(markdown(results))
        if args.paired:
            print(f"[{NAME}] paired timing, {args.paired} rounds ...", flush=True)
            run_paired(results["rows"], args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    path = write_results(f"{NAME}_{name}", results)
    (RESULTS_DIR / f"{NAME}_{name}.md").write_text(markdown(results))
    print()
    print(markdown(results))
    print(f"written: {path} and {path.with_suffix('.md')}")
    return 0 if all(r.get("ok") for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
