"""CPU vs CUDA parity of compiled models, for a machine with an NVIDIA GPU and onnxruntime-gpu.

Two steps, because the GPU machine usually lacks the corpus package and the network:

    python bench/cuda_parity.py prepare --out DIR
        (here) writes the exact calibration and held-out token windows that `--calib zh-news --samples 64
        --seq-len 256 --seed 0` draws, as .npz folders per model (DIR/<model>/NNN.npz: 64 calibration windows,
        then 7 held-out windows, so qtc's npz loader holds out exactly those 7).

    python bench/cuda_parity.py run --windows DIR --gguf gemma-3-270m-q4_k_m.gguf --out RESULTS
        (on the GPU machine) exports the models, compiles each recipe from the same windows, and runs
        `qtc parity MODEL --backends cpu,cuda` (same model, both EPs) and `--against` the float export on the
        CPU EP; writes RESULTS/cuda_parity.json and .md.

Each step is a `qtc` CLI call in a subprocess, so one failing recipe is recorded and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CALIB_SAMPLES = 64
HELDOUT = 7  # with 64 calibration files, qtc's npz loader holds out int(71 * 0.1) = 7: exactly these
SEQ_LEN = 256
VARIANTS = {  # label -> `qtc compile` arguments (None: the float export itself)
    "float": None,
    "w8a8": ["--recipe", "w8a8"],
    "w4a16": ["--recipe", "w4a16"],
    "w4a8": ["--recipe", "w4a8"],
    # Budget-gated: parity at the default budget (1.0, dense) and with 30 % of the branches skipped. Branch
    # scoring reads token windows from text, so it calibrates on the corpus excerpt `prepare` writes.
    "w4a16-skip": ["--recipe", "w4a16", "--layer-skip", "--skip-metric", "bi", "--calib", "{corpus}"],
}
EXTRA_FEEDS = {"w4a16-skip": {"budget=0.7": ["--feed", "budget=0.7"]}}


def _qtc(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qtc.cli.main", *args]
    print("$ qtc " + " ".join(args), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


CORPUS = "zh-news-calib-3000.txt"  # the first 3,000 paragraphs of the zh-news calibration split


def prepare(out: Path, models: list[str]) -> None:
    from qtc.calibration.data import load_calibration, model_inputs, text_feed
    from qtc.calibration.workloads import get_workload
    from qtc.frontends.onnx_file import load_model

    out.mkdir(parents=True, exist_ok=True)
    (out / CORPUS).write_text("\n".join(get_workload("zh-news").texts("calib")[:3000]) + "\n", encoding="utf-8")

    for name in models:
        path = _reference_model(name)
        inputs = model_inputs(load_model(path))
        calib = load_calibration("zh-news", tokenizer=path.parent / "tokenizer.json", n_samples=CALIB_SAMPLES,
                                 seq_len=SEQ_LEN, seed=0)
        windows = list(calib.calib_samples) + list(calib.heldout_samples)[:HELDOUT]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, tokens in enumerate(windows):
            np.savez(folder / f"{i:03d}.npz", **text_feed(tokens, inputs))
        (folder / "source.json").write_text(json.dumps(calib.provenance() | {"files": len(windows)}, indent=2) + "\n")
        print(f"{name}: {len(windows)} windows -> {folder}", flush=True)


def _reference_model(name: str) -> Path:
    if name == "zh-tiny-lm":
        from qtc.models.reference import build_reference

        return build_reference(name)
    from qtc.models.registry import export_reference

    return export_reference(name)


def run(windows: Path, gguf: Path | None, out: Path, work: Path, models: list[str], variants: list[str]) -> dict:
    """Results are rewritten after every variant: a run cut short by a time limit still leaves its figures."""
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": _machine(), "models": {}}
    sources = {"zh-tiny-lm": None, "gemma-3-270m": gguf}
    for name in models:
        if not (windows / name).is_dir() or (name == "gemma-3-270m" and gguf is None):
            raise SystemExit(f"{name}: no windows in {windows / name} (or no --gguf for gemma)")
        (work / name).mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        float_path = _export(name, sources[name], work / name)
        entry = results["models"][name] = {"export_seconds": round(time.perf_counter() - started, 1), "variants": {}}
        for label, args in ((v, VARIANTS[v]) for v in variants):
            entry["variants"][label] = _run_variant(label, args, float_path, windows / name, work / name)
            _write(out, results)
    return results


def _export(name: str, source: Path | None, work: Path) -> Path:
    target = work / "float.onnx"
    if target.is_file():  # an earlier call on the same machine exported it already
        return target
    if name == "zh-tiny-lm":
        built = subprocess.run([sys.executable, "-m", "qtc.models.reference", name], capture_output=True, text=True,
                               check=True).stdout.strip().splitlines()[-1]
        return Path(built)
    done = _qtc("export", str(source), "-o", str(target))
    if done.returncode:
        raise SystemExit(f"export of {name} failed: {done.stderr[-2000:]}")
    return target


def _run_variant(label: str, args: list[str] | None, float_path: Path, windows: Path, work: Path) -> dict:
    record: dict = {}
    model = float_path
    if args is not None and (work / f"{label}.onnx").is_file():  # compiled by an earlier call (saves are atomic)
        model = work / f"{label}.onnx"
    elif args is not None:
        model = work / f"{label}.onnx"
        started = time.perf_counter()
        calib = [] if "--calib" in args else ["--calib", str(windows)]
        args = [a.replace("{corpus}", str(windows.parent / CORPUS)) for a in args]
        done = _qtc("compile", str(float_path), *args, *calib, "--no-compare", "-o", str(model))
        record["compile_seconds"] = round(time.perf_counter() - started, 1)
        if done.returncode:
            return record | {"error": done.stderr.strip()[-2000:]}
    checks = [("cpu_vs_cuda", ["--backends", "cpu,cuda"]), ("vs_float_on_cpu", ["--against", str(float_path)])]
    checks += [(f"cpu_vs_cuda {label}", ["--backends", "cpu,cuda", *feed]) for label, feed in EXTRA_FEEDS.get(label, {}).items()]
    for key, extra in checks:
        if key == "vs_float_on_cpu" and args is None:
            continue
        done = _qtc("parity", str(model), *extra, "--inputs", str(windows), "--samples", str(HELDOUT),
                    "--seq-len", str(SEQ_LEN), "--json")
        record[key] = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {"error": done.stderr[-2000:]}
        record[key]["exit_code"] = done.returncode
    return record


def _machine() -> dict:
    import onnxruntime as ort

    info = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["gpu"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["gpu"] = None
    return info


def _write(out: Path, results: dict) -> None:
    (out / "cuda_parity.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    (out / "cuda_parity.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    lines = [f"GPU: {results['machine'].get('gpu')}; onnxruntime {results['machine']['onnxruntime']}", "",
             "| model | build | compared | output | cosine | max abs diff | top-1 agreement | exit |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        for label, record in entry["variants"].items():
            if "error" in record:
                lines.append(f"| {name} | {label} | compile failed | {record['error'][-200:]} | | | | |")
            for key in sorted(k for k in record if k.startswith(("cpu_vs_cuda", "vs_float"))):
                title = key.replace("cpu_vs_cuda", "CUDA vs CPU").replace("vs_float_on_cpu", "vs float (CPU)")
                lines += _rows(name, label, title, record[key])
    return "\n".join(lines) + "\n"


def _rows(name: str, label: str, title: str, data: dict | None) -> list[str]:
    if data is None:
        return []
    if "error" in data:
        return [f"| {name} | {label} | {title} | error: {data['error'][-200:]} | | | | {data['exit_code']} |"]
    compared = data["against"] if title.startswith("vs") else data["backends"].get("cuda", {})
    if "outputs" not in compared:
        return [f"| {name} | {label} | {title} | unavailable: {compared.get('reason')} | | | | {data['exit_code']} |"]
    return [f"| {name} | {label} | {title} | {out} | {s['cosine']:.6f} | {s['max_abs_diff']:.4g} | "
            f"{s.get('top1_agreement', float('nan')):.2%} | {data['exit_code']} |" for out, s in compared["outputs"].items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", default="zh-tiny-lm,gemma-3-270m")
    r = sub.add_parser("run")
    r.add_argument("--windows", type=Path, required=True)
    r.add_argument("--gguf", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, default=Path("/tmp/qtc-cuda-parity"))
    r.add_argument("--models", default="zh-tiny-lm,gemma-3-270m")
    r.add_argument("--variants", default=",".join(VARIANTS), help="which builds (float is the export itself)")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.out, args.models.split(","))
    else:
        print(markdown(run(args.windows, args.gguf, args.out, args.work, args.models.split(","), args.variants.split(","))))


if __name__ == "__main__":
    main()
