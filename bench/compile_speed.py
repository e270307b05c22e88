"""qtc compile against its forward-pass limit and against ORT's quantize_static, side by side on one machine.

    python bench/compile_speed.py MODEL.onnx [--samples 64] [--seq-len 256] [--recipes w8a8,...] [--max-drop kl=0.05]
                                             [--eval-limit 30]

Every step runs in its own fresh process, one after another, on the same calibration windows written once as .npz
files (SAMPLES calibration windows of SEQ_LEN zh-news tokens + 8 held out, the model's own empty KV cache where it
has one), so qtc and ORT read exactly the same tensors:
- limit: one plain ORT CPU session runs the SAMPLES windows, all outputs fetched (session creation timed apart);
- ort: onnxruntime.quantization.quantize_static (QDQ, per-channel, MinMax, int8/int8, default op types), reading
  the same windows; peak RSS from os.wait4 (ORT does not reset its VmHWM);
- each recipe: `qtc compile MODEL --recipe R --calib WINDOWS --samples SAMPLES` (post-compile check and held-out
  comparison on, as a user runs it); peak RSS from the report (qtc resets VmHWM per pass, so wait4 under-reads);
  the report's `seconds` split shows the passes and the checks;
- --max-drop: the first recipe again with `--max-drop`, total time;
- --paired-limit: the limit timed again right before each compile, and each compile's ratio taken to that one;
- --eval-limit N: `qtc eval OUT --task zh-news-ppl --baseline MODEL --limit N` for each output (bits/char delta).
Writes bench/results/compile_speed_NAME.{json,md}; NAME is the model folder's name up to its hash.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS_DIR, machine, qtc_json, run_measured, table, write_worker_result  # noqa: E402

HELDOUT = 8
RECIPES = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPES = f"w8a8,w8a8-sq-down16,{RECIPES / 'w4a16-gptq.yaml'},w4a16-mlp8-awq"


def write_windows(model: Path, folder: Path, samples: int, seq_len: int) -> None:
    """zh-news windows as npz files named in order: qtc holds out the last 10 %, so of 10 x HELDOUT files or more
    the last HELDOUT are held out and `--samples SAMPLES` calibrates on the first SAMPLES (so does ORT here)."""
    import numpy as np

    from qtc.calibration.data import load_calibration, model_inputs
    from qtc.frontends.onnx_file import load_model

    inputs = model_inputs(load_model(model))
    calib = load_calibration("zh-news", tokenizer=model.parent / "tokenizer.json", n_samples=max(samples + HELDOUT, 10 * HELDOUT),
                             seq_len=seq_len, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(calib.feeds(inputs)):
        np.savez(folder / f"{i:04d}.npz", **feed)


def worker(args) -> None:
    """The limit and ORT steps, run as `python compile_speed.py --worker limit|ort ...` in a fresh process."""
    import numpy as np
    import onnxruntime as ort

    files = sorted(Path(args.windows).glob("*.npz"))[: args.samples]
    feeds = [dict(np.load(path)) for path in files]
    result = {}
    if args.worker == "limit":
        options = ort.SessionOptions()
        options.log_severity_level = 3
        started = time.perf_counter()
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
        result["session_seconds"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        for feed in feeds:
            session.run(None, feed)
        result["forward_seconds"] = round(time.perf_counter() - started, 2)
    else:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.rest = iter(feeds)

            def get_next(self):
                return next(self.rest, None)

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        quantize_static(args.model, args.out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
        result["quantize_seconds"] = round(time.perf_counter() - started, 2)
    write_worker_result(args.result, result)


def step(args, work: Path, name: str, extra: list[str]) -> dict:
    result = work / f"{name}.json"
    seconds, peak, _ = run_measured([sys.executable, __file__, str(args.model), "--worker", name, "--windows",
                                     str(work / "windows"), "--samples", str(args.samples), "--result", str(result),
                                     *extra], work / f"{name}.out")
    return json.loads(result.read_text()) | {"process_seconds": seconds, "peak_rss_bytes": peak}


def compile_recipe(args, work: Path, recipe: str, extra: list[str], label: str) -> dict:
    out = work / label / "model.onnx"
    seconds, _, _ = run_measured([sys.executable, "-m", "qtc.cli.main", "compile", str(args.model), "--recipe", recipe,
                                  "--calib", str(work / "windows"), "--samples", str(args.samples), "-o", str(out),
                                  "--json", *extra], work / f"{label}.json")
    report = json.loads((work / f"{label}.json").read_text())
    checks = report["seconds"]["checks"]
    return {"label": label, "recipe": recipe, "output": str(out), "process_seconds": seconds,
            "compile_seconds": report["compile_seconds"],
            # what the compile costs without the held-out comparison's extra forwards (`--no-compare`)
            "without_comparison_seconds": round(report["compile_seconds"] - checks.get("heldout_comparison", 0)
                                                - checks.get("runtime_ops", 0), 1),
            "seconds": report["seconds"], "peak_rss_bytes": report["memory"]["process_peak_rss_bytes"],
            "fallback": report.get("fallback")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--recipes", default=DEFAULT_RECIPES)
    parser.add_argument("--max-drop", default="kl=0.05", help="'' to skip")
    parser.add_argument("--eval-limit", type=int, default=30, help="0 to skip")
    parser.add_argument("--skip-ort", action="store_true")
    parser.add_argument("--paired-limit", action="store_true",
                        help="time the limit again right before each compile; its ratio is to that one")
    parser.add_argument("--work", type=Path, help="keep outputs here (default: a temporary folder)")
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--worker", choices=("limit", "ort"), help=argparse.SUPPRESS)
    parser.add_argument("--windows", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--rewrite", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rewrite:
        return rewrite(args.rewrite)
    if args.worker:
        return worker(args)
    if args.model is None:
        parser.error("MODEL is required")
    args.model = args.model.resolve()
    name = args.model.parent.name.rsplit("-", 1)[0] + (f"-{args.tag}" if args.tag else "")
    with tempfile.TemporaryDirectory(prefix="qtc-speed-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        write_windows(args.model, work / "windows", args.samples, args.seq_len)
        rows = {"limit": step(args, work, "limit", [])}
        print(f"limit: {rows['limit']}", flush=True)
        if not args.skip_ort:
            rows["ort"] = step(args, work, "ort", ["--out", str(work / "ort" / "model.onnx")])
            print(f"ort: {rows['ort']}", flush=True)
        jobs = [(recipe, [], Path(recipe).stem) for recipe in args.recipes.split(",")]
        if args.max_drop:
            first = args.recipes.split(",")[0]
            jobs.append((first, ["--max-drop", args.max_drop], f"{Path(first).stem}-max-drop"))
        compiles = []
        for recipe, extra, label in jobs:
            # a 2-core box's speed drifts by ~10 % over the half hour a run takes (ORT's quantize_static 113 vs
            # 122 s in two runs): a limit timed next to each compile keeps its ratio to like conditions
            limit = step(args, work, "limit", [])["forward_seconds"] if args.paired_limit else None
            compiles.append(compile_recipe(args, work, recipe, extra, label) | {"limit_seconds": limit})
            print(f"{label}: {compiles[-1]['compile_seconds']} s (limit before it: {limit} s)", flush=True)
        if args.eval_limit:
            for row in compiles:
                row["eval"] = qtc_json("eval", row["output"], "--task", "zh-news-ppl", "--baseline", str(args.model),
                                       "--limit", str(args.eval_limit))
        write(name, args, rows, compiles)


def rewrite(path: Path) -> None:
    """Rewrite a result's .md from its .json (python compile_speed.py --rewrite RESULT.json)."""
    data = json.loads(path.read_text())
    args = argparse.Namespace(samples=data["samples"], seq_len=data["seq_len"])
    write(path.stem.removeprefix("compile_speed_"), args, data["steps"], data["compiles"])


def _delta(row: dict) -> str:
    delta = ((row.get("eval") or {}).get("metrics") or {}).get("delta_bits_per_char")
    if not delta:
        return "-"
    return f"{delta['value']:+.3f} [{delta['ci95'][0]:+.3f}, {delta['ci95'][1]:+.3f}]"


def write(name: str, args, rows: dict, compiles: list[dict]) -> None:
    limit = rows["limit"]["forward_seconds"]
    ort_row = rows.get("ort")
    paired = [row["limit_seconds"] for row in compiles if row.get("limit_seconds")]
    lines = [f"# qtc compile vs its forward-pass limit and ORT quantize_static: {name}", "",
             f"{args.samples} x {args.seq_len} zh-news windows (+{HELDOUT} held out) as .npz, read by every step; each "
             "step a fresh process, one after another on one machine.", "",
             f"- forward-pass limit: {args.samples} windows through one plain ORT CPU session: **{limit:.1f} s** "
             f"(+{rows['limit']['session_seconds']:.1f} s session creation), peak RSS "
             f"{rows['limit']['peak_rss_bytes'] / 1e9:.2f} GB"]
    if paired:
        lines.append(f"- the limit timed again right before each compile: {min(paired):.1f}-{max(paired):.1f} s; each "
                     "compile's x limit is to the limit timed before it (`--paired-limit`)")
    if ort_row:
        lines.append(f"- ORT quantize_static (QDQ, per-channel, MinMax, int8/int8): **{ort_row['process_seconds']:.1f} s** "
                     f"wall ({ort_row['quantize_seconds']:.1f} s in quantize_static), peak RSS "
                     f"{ort_row['peak_rss_bytes'] / 1e9:.2f} GB")
    lines += ["", table(
        ["compile", "wall s", "x limit", "x ORT", "w/o held-out comparison s (x limit)", "calibration passes s",
         "checks s", "peak RSS GB", "Δ bits/char [95% CI]"],
        [[row["label"], f"{row['process_seconds']:.1f}", f"{row['process_seconds'] / _limit(row, limit):.2f}",
          f"{row['process_seconds'] / ort_row['process_seconds']:.2f}" if ort_row else "-",
          *(["-", "-", "-"] if row.get("fallback") else  # a --max-drop report's split is its last attempt's
            [f"{row['without_comparison_seconds']:.1f} "
             f"({row['without_comparison_seconds'] / _limit(row, limit):.2f})",
             f"{sum(v for k, v in row['seconds']['passes'].items() if k in _STREAMING):.1f}",
             f"{sum(row['seconds']['checks'].values()):.1f}"]),
          f"{row['peak_rss_bytes'] / 1e9:.2f}", _delta(row)]
         for row in compiles])]
    fallback = [row for row in compiles if row.get("fallback")]
    for row in fallback:
        attempts = row["fallback"]["attempts"]
        lines += ["", f"{row['label']}: {row['process_seconds'] / compiles[0]['process_seconds']:.2f}x the "
                  f"{compiles[0]['label']} compile; budget {'met' if row['fallback']['met'] else 'not met'}; attempts "
                  + ", ".join(f"{a['kept_layers']} kept: drop {a['drop']:.4f} ({a['calibration']}, {a['seconds']} s)"
                              for a in attempts)]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"compile_speed_{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS_DIR / f"compile_speed_{name}.json").write_text(json.dumps(
        {"machine": machine(), "samples": args.samples, "seq_len": args.seq_len, "steps": rows, "compiles": compiles},
        indent=2, sort_keys=True, default=str) + "\n")
    print("\n".join(lines))


def _limit(row: dict, limit: float) -> float:
    """The limit a compile is measured against: the one timed right before it, where there is one."""
    return row.get("limit_seconds") or limit


_STREAMING = ("CollectLayerStatisticsPass", "CalibrateActivationsPass", "RoundWeightsPass", "SmoothActivationsPass")

if __name__ == "__main__":
    main()
