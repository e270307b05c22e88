"""Peak memory and wall time of `qtc compile` against parameter count, one model after another on one machine.

    nice python bench/compile_scaling.py NAME=MODEL.onnx[@SAMPLES] ... [--recipe w4a16] [--memory-limit 6GB]
        [--calib zh-news --samples 64 --seq-len 256] [--add NAME=OUT.qtc.json ...] [--rows EARLIER.json] [--tag T]

Each compile is `qtc compile MODEL --recipe R --no-compare --memory-limit L -o TMP` in its own process (with
`--calib C --samples N --seq-len S` for a calibrated recipe; `@SAMPLES` after a model overrides N for it); its peak
RSS is that process's own VmHWM (the report's `memory.process_peak_rss_bytes`), and the post-compile check's child
process (which loads the compiled model in ONNX Runtime when the float source is over half the limit) is reported
apart (`child_peak_rss_bytes`); os.wait4's ru_maxrss, the largest of the two, is `tree_peak_rss_bytes`. Parameters
are the source's float32 tensor bytes / 4. `--add` takes a row from the report of a compile run apart the same way
(a 7B compile that takes an hour; `:TIME_LOG`, its `/usr/bin/time -v` log, gives its CPU seconds). The plot's time
axis is CPU seconds (user + system, children included) where every row has them, else the report's
`compile_seconds`; for a calibrated recipe it is drawn against parameters x calibration tokens, the work a
forward pass per sample does.
Writes bench/results/compile_scaling_RECIPE[_TAG].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS_DIR, machine, run_measured  # noqa: E402


def compile_once(model: Path, recipe: str, limit: str, calib: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="qtc-scaling-", dir=model.parent.parent) as folder:
        out = Path(folder) / "model.onnx"
        command = [sys.executable, "-m", "qtc.cli.main", "compile", str(model), "--recipe", recipe, "--no-compare",
                   "--memory-limit", limit, "-o", str(out), "--json", *calib]
        seconds, tree_peak, cpu = run_measured(command, Path(folder) / "report.json")
        report = json.loads((Path(folder) / "report.json").read_text())
        output_bytes = sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.startswith("model.onnx"))
    return row(report, output_bytes) | {"seconds": round(seconds, 1), "cpu_seconds": cpu, "tree_peak_rss_bytes": tree_peak}


def row(report: dict, output_bytes: int) -> dict:
    source = report["size"]["source_tensor_bytes"]
    calibration = report.get("calibration") or {}
    samples = calibration.get("samples") or 0
    return {"parameters": source // 4, "source_bytes": source, "output_bytes": output_bytes,
            "compile_seconds": round(report["compile_seconds"], 1), "seconds": round(report["compile_seconds"], 1),
            "samples": samples, "tokens": samples * (calibration.get("seq_len") or 0),
            "peak_rss_bytes": report["memory"]["process_peak_rss_bytes"],
            "check_child_peak_rss_bytes": report["post_compile_check"].get("child_peak_rss_bytes"), "memory": report["memory"],
            "check": {k: v for k, v in report["post_compile_check"].items() if k != "cosine"}}


def added_row(item: str) -> dict:
    """NAME=OUT.qtc.json[:TIME_LOG]: the sidecar report of a compile run apart, with its output's files; CPU
    seconds from `/usr/bin/time -v`'s log of that run where given."""
    name, _, paths = item.partition("=")
    path, _, time_log = paths.partition(":")
    report = json.loads(Path(path).read_text())
    cpu = None
    if time_log:
        fields = dict(line.strip().rsplit(": ", 1) for line in Path(time_log).read_text().splitlines() if ": " in line)
        cpu = round(float(fields["User time (seconds)"]) + float(fields["System time (seconds)"]), 1)
    return {"name": name, **row(report, report["output"]["bytes"]), "cpu_seconds": cpu, "run": "apart (its own report)"}


def plot(rows: list[dict], path: Path, recipe: str, limit: str) -> None:
    import matplotlib  # noqa: PLC0415 - optional extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    params = [r["parameters"] / 1e9 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.2))
    left.plot(params, [r["peak_rss_bytes"] / 1e9 for r in rows], "o-", label="qtc compile: peak RSS")
    left.plot(params, [r["source_bytes"] / 1e9 for r in rows], "s--", color="grey", label="float32 weights")
    checked = [(x, r["check_child_peak_rss_bytes"] / 1e9) for x, r in zip(params, rows) if r["check_child_peak_rss_bytes"]]
    if checked:
        left.plot(*zip(*checked), "^", color="tab:red", label="post-compile check child (ORT loads the output)")
    left.set(xscale="log", yscale="log", xlabel="parameters (billions)", ylabel="GB", title=f"{recipe}: memory (limit {limit})")
    calibrated = all(r.get("tokens") for r in rows)
    work = [r["parameters"] * r["tokens"] / 1e12 if calibrated else r["parameters"] / 1e9 for r in rows]
    # CPU seconds where every row has them: wall time on a 2-core box shared with other jobs says little
    key = "cpu_seconds" if all(r.get("cpu_seconds") for r in rows) else "compile_seconds"
    right.plot(work, [r[key] for r in rows], "o", label="qtc compile")
    if calibrated:  # time linear in parameters x tokens: one constant, the median seconds per unit of work
        per = sorted(r[key] / x for r, x in zip(rows, work))[len(rows) // 2]
        span = [min(work), max(work)]
        right.plot(span, [per * x for x in span], "--", color="grey", label=f"linear: {per:.0f} s per 10^12 parameter-tokens")
        right.legend(fontsize=8)
    right.set(xscale="log", yscale="log", ylabel="CPU seconds" if key == "cpu_seconds" else "compile seconds",
              title=f"{recipe}: {'CPU' if key == 'cpu_seconds' else 'wall'} time",
              xlabel="parameters x calibration tokens (10^12)" if calibrated else "parameters (billions)")
    left.axhline(parse_limit(limit) / 1e9, color="tab:green", linestyle=":", label=f"--memory-limit {limit}")
    # the models name the memory plot's x ticks (labels beside its points overprinted each other and the lines);
    # on the time plot, where models of similar work sit at different heights, each label stands right of its
    # point (left of the last one)
    _name_ticks(left, params, [f"{r['name']} ({x:.2g})" for r, x in zip(rows, params)])
    for i, (r, x) in enumerate(zip(rows, work)):
        last = i == len(rows) - 1
        right.annotate(f"{r['name']} ({r['samples']} x)" if r.get("tokens") else r["name"], (x, r[key]),
                       textcoords="offset points", xytext=(-6 if last else 6, 0), ha="right" if last else "left",
                       va="center", fontsize=7)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _name_ticks(axis, xs: list[float], names: list[str]) -> None:
    from matplotlib.ticker import NullLocator  # noqa: PLC0415 - optional extra

    axis.set_xticks(xs, names, rotation=30, ha="right", fontsize=7)
    axis.xaxis.set_minor_locator(NullLocator())


def parse_limit(text: str) -> float:
    units = {"GB": 1e9, "MB": 1e6, "GIB": 2**30, "MIB": 2**20}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="NAME=PATH/model.onnx[@SAMPLES], smallest first")
    parser.add_argument("--recipe", default="w4a16")
    parser.add_argument("--memory-limit", default="6GB")
    parser.add_argument("--calib", help="calibration data for a calibrated recipe (e.g. zh-news)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--add", action="append", default=[], help="NAME=OUT.qtc.json[:TIME_LOG] of a compile run apart")
    parser.add_argument("--rows", type=Path, action="append", default=[], help="rows of an earlier result .json")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    rows = []
    for item in args.models:
        name, _, path = item.partition("=")
        path, _, samples = path.partition("@")
        calib = ["--calib", args.calib, "--samples", samples or str(args.samples), "--seq-len", str(args.seq_len)] \
            if args.calib else []
        rows.append({"name": name, **compile_once(Path(path), args.recipe, args.memory_limit, calib)})
        print(json.dumps(rows[-1]), flush=True)
    rows += [row for path in args.rows for row in json.loads(path.read_text())["rows"]]
    rows = sorted(rows + [added_row(item) for item in args.add], key=lambda r: r["parameters"])
    recipe = Path(args.recipe).stem
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / (f"compile_scaling_{recipe}" + (f"_{args.tag}" if args.tag else ""))
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine(), "recipe": args.recipe, "calib": args.calib,
                                                     "memory_limit": args.memory_limit, "rows": rows}, indent=1))
    lines = [f"# qtc compile {recipe} --memory-limit {args.memory_limit}: peak RSS and time vs parameters", "",
             "| model | parameters | float32 GB | samples | output GB | compile peak RSS GB | RSS / float | check child peak RSS GB | spilled GB | compile s | CPU s | check |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        spilled = (r["memory"]["spilled"] or {}).get("bytes", 0) / 1e9
        how = "child process, source not run" if r["check"].get("skipped_source") else f"vs source ({r['check'].get('source_run_by')})"
        lines.append(f"| {r['name']} | {r['parameters'] / 1e9:.2f} B | {r['source_bytes'] / 1e9:.2f} | {r['samples'] or '-'} "
                     f"| {r['output_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / r['source_bytes']:.2f} "
                     f"| {(r['check_child_peak_rss_bytes'] or 0) / 1e9:.2f} | {spilled:.2f} "
                     f"| {r['compile_seconds']} | {r.get('cpu_seconds') or '-'} | {how} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, stem.with_suffix(".png"), recipe, args.memory_limit)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
