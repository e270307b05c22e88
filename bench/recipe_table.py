"""One table of recipes on one model: bits/char (paired CIs vs float), KL, top-1, size, compile time, kernels.

Every row is compiled on exactly the same calibration windows (qtc's `load_calibration("zh-news", ...)`; the ORT
rows get those windows through a CalibrationDataReader) and evaluated against the float model on the
zh-news-ppl task (first --limit paragraphs of the zh-news eval split, paired bootstrap intervals).

Rows (--rows picks a comma list; default all, in this order):
- float:                the model itself (its bits/char and CI; deltas are 0 by construction)
- w8a8, w8a16, w4a8:    qtc built-in recipes (w4a8-gptq: w4a8 with GPTQ rounding)
- w8a8-smooth:          w8a8 + SmoothQuant alpha 0.5;  w8a8-smooth-auto: alpha "auto" (per activation)
- w4a16-{rtn,gptq,awq}-b{32,128}: int4 symmetric weight-only, block 32 / 128, RTN / GPTQ / AWQ
- w8a8-sq-down16, w4a16-mlp8: the built-in mixes made for outlier-heavy models such as Gemma
                        (w4a16-mlp8-{gptq,awq}: its int4 attention projections rounded by GPTQ / AWQ)
- w8a8-sq-down16-{p,mse}, w8a8-sqauto-down16[-mse]: that mix with percentile-99.99 / MSE activation ranges, or
                        with SmoothQuant alpha "auto"; w8a8-sq-down16-v: plus v_proj of layers 8-10 at w8a16
- ort-quantize-static:  onnxruntime quantize_static(QDQ, per_channel, MinMax, QInt8/QInt8, default op types)
- ort-matmulnbits-rtn:  MatMulNBitsQuantizer, DefaultWeightOnlyQuantConfig(4 bit, block 32, symmetric)
- ort-matmulnbits-gptq: MatMulNBitsQuantizer, GPTQWeightOnlyQuantConfig (the INC-derived GPTQ) with the same
                        calibration windows, 4 bit, block 32, symmetric (--skip-slow leaves it out;
                        --ort-gptq-samples N feeds it only the first N windows, noted in the table)

Rows run in this process one after another; a failing row is recorded with its error and the rest go on. The
JSON is rewritten after every row, so an interrupted run keeps what it measured.

    python bench/recipe_table.py MODEL_ONNX [--samples 64] [--seq-len 256] [--limit N] [--rows ROWS]
                                            [--out NAME] [--workdir DIR] [--skip-slow] [--ort-gptq-samples N]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS_DIR, machine, write_results  # noqa: E402
from compile_vs_ort import graph_facts  # noqa: E402

from qtc.calibration.ort_reader import CalibrationReader  # noqa: E402

NAME = "recipe_table"
WORKLOAD = "zh-news"
TASK = "zh-news-ppl"


def _w4a16(algorithm: str, block: int) -> dict:
    return {"base": "w4a16", "name": f"w4a16-{algorithm}-b{block}", "weight": {"algorithm": algorithm, "block_size": block}}


# row -> qtc recipe (a built-in name or a dict for qtc.recipes.parse_recipe)
QTC_ROWS: dict[str, str | dict] = {
    "w8a8": "w8a8",
    "w8a8-smooth": {"base": "w8a8", "name": "w8a8-smooth", "smooth": {"alpha": 0.5}},
    "w8a8-smooth-auto": {"base": "w8a8", "name": "w8a8-smooth-auto", "smooth": {"alpha": "auto"}},
    "w8a16": "w8a16",
    **{f"w4a16-{a}-b{b}": _w4a16(a, b) for a in ("rtn", "gptq", "awq") for b in (32, 128)},
    "w4a8": "w4a8",
    "w4a8-gptq": {"base": "w4a8", "name": "w4a8-gptq", "weight": {"algorithm": "gptq"}},
    "w8a8-sq-down16": "w8a8-sq-down16",
    # + the v_proj inputs `qtc analyze` ranks next on gemma-3-270m (layers 8-10, |x| up to 138 vs a median of 6)
    "w8a8-sq-down16-v": {"base": "w8a8-sq-down16", "name": "w8a8-sq-down16-v", "overrides": [
        {"name": "*layers.[89].self_attn.v_proj*", "recipe": "w8a16"},
        {"name": "*layers.10.self_attn.v_proj*", "recipe": "w8a16"}]},
    "w4a16-mlp8": "w4a16-mlp8",
    "w4a16-mlp8-gptq": {"base": "w4a16-mlp8", "name": "w4a16-mlp8-gptq", "weight": {"algorithm": "gptq"}},
    "w4a16-mlp8-awq": {"base": "w4a16-mlp8", "name": "w4a16-mlp8-awq", "weight": {"algorithm": "awq"}},
    # the same with clipped activation ranges instead of minmax
    "w8a8-sq-down16-p": {"base": "w8a8-sq-down16", "name": "w8a8-sq-down16-p",
                         "activation": {"calibrator": "percentile", "percentile": 99.99}},
    "w8a8-sq-down16-mse": {"base": "w8a8-sq-down16", "name": "w8a8-sq-down16-mse", "activation": {"calibrator": "mse"}},
    "w8a8-sqauto-down16": {"base": "w8a8-sq-down16", "name": "w8a8-sqauto-down16", "smooth": {"alpha": "auto"}},
    "w8a8-sqauto-down16-mse": {"base": "w8a8-sq-down16", "name": "w8a8-sqauto-down16-mse", "smooth": {"alpha": "auto"},
                               "activation": {"calibrator": "mse"}},
}
ORT_ROWS = ("ort-quantize-static", "ort-matmulnbits-rtn", "ort-matmulnbits-gptq")
ROWS = ("float", *QTC_ROWS, *ORT_ROWS)
SLOW_ROWS = ("ort-matmulnbits-gptq",)

# ops of the graph ORT CPU really runs that say which numerics a row gets (short names in the table)
KERNEL_OPS = ("MatMulNBits", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger",
              "QLinearConv", "FusedMatMul", "MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear",
              "DynamicQuantizeLinear")
SHORT = {"QuantizeLinear": "Q", "DequantizeLinear": "DQ", "DynamicQuantizeLinear": "DynQ"}


# ------------------------------------------------------------------------------------------------ rows


def _calibration(args, tokenizer: Path):
    from qtc.calibration.data import load_calibration, model_inputs
    from qtc.frontends.onnx_file import load_model

    calib = load_calibration(WORKLOAD, tokenizer=tokenizer, n_samples=args.samples, seq_len=args.seq_len, seed=0)
    return calib, model_inputs(load_model(args.model))


def _qtc_row(row: str, args, out: Path) -> dict:
    import qtc
    from qtc.recipes import parse_recipe

    spec = QTC_ROWS[row]
    recipe = spec if isinstance(spec, str) else parse_recipe(spec)
    result = qtc.compile(args.model, recipe=recipe, calib=WORKLOAD, samples=args.samples, seq_len=args.seq_len,
                         seed=0, quiet=True)
    result.save(out)
    report = result.report
    return {
        "tool": "qtc",
        "recipe": report.get("recipe"),
        "compile_seconds": report.get("compile_seconds"),
        "calibration": report.get("calibration"),
        "runtime_ops": (report.get("runtime_ops") or {}).get("ops"),
        "runtime_numerics": (report.get("runtime_ops") or {}).get("numerics"),
        "session_config": (report.get("runtime_ops") or {}).get("session_config"),
        "heldout_comparison": report.get("heldout_comparison"),
        "size": report.get("size"),
        "output": report.get("output"),
        "quantized_nodes_by_op": (report.get("compiled") or {}).get("quantized_nodes_by_op"),
        "kept_float_roles": (report.get("compiled") or {}).get("kept_float_roles"),
        "target_notes": report.get("target_notes"),
        "warnings": report.get("warnings"),
        "rounding": report.get("rounding"),
        "smoothing": report.get("smoothing"),
    }


def _ort_row(row: str, args, out: Path, tokenizer: Path) -> dict:
    logging.getLogger().setLevel(logging.ERROR)  # "please run pre-processing" and friends
    started = time.perf_counter()
    calib, inputs = _calibration(args, tokenizer)
    settings: dict
    if row == "ort-quantize-static":
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        settings = {"quant_format": "QDQ", "per_channel": True, "calibrate_method": "MinMax",
                    "activation_type": "QInt8", "weight_type": "QInt8", "op_types_to_quantize": "default"}
        quantize_static(args.model, str(out), CalibrationReader(calib, inputs), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            GPTQWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        block, symmetric = 32, True
        if row == "ort-matmulnbits-rtn":
            config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=4)
            settings = {"algo_config": "DefaultWeightOnlyQuantConfig", "bits": 4, "block_size": block,
                        "is_symmetric": symmetric}
        else:
            # ORT's GPTQ runs the whole model once per window per distinct MatMul input (gemma-3-270m: 72 inputs),
            # so a large model may get only the first --ort-gptq-samples windows; the row records how many.
            windows = min(args.ort_gptq_samples or args.samples, args.samples)
            config = GPTQWeightOnlyQuantConfig(calibration_data_reader=CalibrationReader(calib, inputs, windows))
            settings = {"algo_config": "GPTQWeightOnlyQuantConfig", "calibration_windows": windows, "bits": 4, "group_size": block,
                        "is_symmetric": symmetric, "percdamp": config.percdamp, "gptq_blocksize": config.block_size,
                        "actorder": config.actorder, "mse": config.mse, "perchannel": config.perchannel}
        # bits / block_size / is_symmetric of the quantizer itself set the per-node config the GPTQ path uses.
        # A ModelProto with its external data loaded, as ORT's own CLI passes it: given a path, the INC-derived
        # GPTQ path builds a session from the serialized bytes of a model that still points at external data,
        # and ORT refuses ("External data path for model loaded from bytes escapes working directory").
        import onnx

        quantizer = MatMulNBitsQuantizer(onnx.load(args.model), bits=4, block_size=block, is_symmetric=symmetric,
                                         algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), True)
    compile_seconds = time.perf_counter() - started
    return {"tool": "onnxruntime", "settings": settings, "compile_seconds": round(compile_seconds, 3),
            "calibration": calib.provenance(), "runtime_ops": _runtime_ops(out)}


def _runtime_ops(path: Path) -> dict:
    from qtc.backends import get_backend
    from qtc.frontends.onnx_file import load_model

    return get_backend("cpu").runtime_ops(load_model(path))


def _evaluate(path: Path, args) -> dict:
    from qtc.measure.evaluation import evaluate

    result = evaluate(path, TASK, baseline=args.model, limit=args.limit, quiet=True)
    return {"data": result["data"], "metrics": result["metrics"], "model_metadata_keys": sorted(result["model"]["metadata"])}


def run_row(row: str, args, workdir: Path, tokenizer: Path) -> dict:
    entry: dict = {"row": row}
    started = time.perf_counter()
    try:
        if row == "float":
            path = Path(args.model)
            entry.update({"tool": "none", "compile_seconds": None, "runtime_ops": _runtime_ops(path)})
        else:
            folder = workdir / row
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            path = folder / "model.onnx"
            entry.update(_qtc_row(row, args, path) if row in QTC_ROWS else _ort_row(row, args, path, tokenizer))
        entry["files"] = graph_facts(path)
        entry["bytes"] = entry["files"]["bytes_on_disk"]
        eval_started = time.perf_counter()
        entry["eval"] = _evaluate(path, args)
        entry["eval_seconds"] = round(time.perf_counter() - eval_started, 2)
        entry["ok"] = True
    except Exception as exc:  # noqa: BLE001 - one failing row must not hide the others
        entry["ok"] = False
        entry["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
        entry["traceback"] = traceback.format_exc()[-4000:]
    entry["row_seconds"] = round(time.perf_counter() - started, 2)
    return entry


# ---------------------------------------------------------------------------------------------- output


def _ci(metric: dict | None, digits: int) -> str:
    if not metric:
        return "-"
    lo, hi = metric.get("ci95") or (None, None)
    text = f"{metric['value']:.{digits}f}"
    return text if lo is None else f"{text} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _value(metric: dict | None, digits: int, style: str = "f") -> str:
    return "-" if not metric else f"{metric['value']:.{digits}{style}}"


def kernels(ops: dict | None) -> str:
    if not ops:
        return "-"
    counts: dict[str, int] = {}
    for key, n in ops.items():
        op = key.split("::")[-1]
        if op in KERNEL_OPS:
            counts[SHORT.get(op, op)] = counts.get(SHORT.get(op, op), 0) + n
    return ", ".join(f"{op} {n}" for op, n in counts.items()) or "-"


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for entry in results["rows"]:
        if entry.get("skipped"):
            rows.append([entry["row"], "skipped", "", "", "", "", "", ""])
            continue
        if not entry.get("ok"):
            rows.append([entry["row"], "FAILED (see notes)", "", "", "", "", "", kernels(entry.get("runtime_ops"))])
            continue
        m = entry["eval"]["metrics"]
        seconds = entry.get("compile_seconds")
        rows.append([
            entry["row"],
            _ci(m.get("bits_per_char"), 3),
            _ci(m.get("delta_bits_per_char"), 4),
            _value(m.get("kl_per_token"), 2, "e"),
            _value(m.get("top1_agreement"), 4),
            f"{entry['bytes'] / 1e6:.2f}",
            "-" if seconds is None else f"{seconds:.1f}",
            kernels(entry.get("runtime_ops")),
        ])
    return rows


HEADERS = ["row", "bits/char [95% CI]", "Δ bits/char [95% CI]", "KL/token", "top-1 agr.", "MB", "compile s", "kernels"]


def markdown(results: dict) -> str:
    c, e = results.get("calibration") or {}, results.get("eval_data") or {}
    lines = [
        f"# Recipe table: {results['model']['file']}",
        "",
        f"- model: `{results['model']['path']}` ({results['model'].get('n_params') or '?'} params, "
        f"{results['model']['bytes'] / 1e6:.2f} MB), sha256 {results['model'].get('sha256') or '?'}",
        f"- calibration: workload {WORKLOAD} split sha256 `{c.get('sha256')}`, {c.get('samples')} x "
        f"{c.get('seq_len')} tokens, seed {c.get('seed')}, tokenizer sha256 `{c.get('tokenizer_sha256')}` "
        "(every row uses these windows)",
        f"- eval: task {TASK}, {e.get('name')}/{e.get('split')} split sha256 `{e.get('sha256')}`, "
        f"{e.get('units_scored')} of {e.get('n_items')} paragraphs, {results.get('eval_chars')} of "
        f"{e.get('n_chars')} characters; 95% CIs: paired bootstrap over paragraphs",
        f"- machine: {results['machine'].get('cpus')} CPUs, onnxruntime {results['machine'].get('onnxruntime')}; "
        f"total run {results.get('total_seconds', 0):.0f} s",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 2) + ["---"]) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table_rows(results)]
    lines += ["", "KL/token: mean KL(float || row) per predicted token, nats. "
              "MB: the saved .onnx plus its external data files (10^6 bytes). compile s: qtc's compile_seconds / "
              "wall time of the ORT tool, both including building the calibration set (qtc's also its held-out "
              "comparison and runtime-op check). kernels: MatMul-like ops "
              "(and Q/DQ) in the graph ORT CPU runs after its own fusions."]
    notes = []
    for entry in results["rows"]:
        row = entry["row"]
        if entry.get("skipped"):
            notes.append(f"- {row}: skipped ({entry['skipped']})")
        elif not entry.get("ok"):
            notes.append(f"- {row}: FAILED: {entry.get('error', '').splitlines()[0] if entry.get('error') else '?'}")
        windows = (entry.get("settings") or {}).get("calibration_windows")
        if windows is not None and windows < (c.get("samples") or windows):
            notes.append(f"- {row}: calibrated on the first {windows} of the {c.get('samples')} windows")
        for note in entry.get("target_notes") or []:
            notes.append(f"- {row}: target note: {note}")
        for warning in entry.get("warnings") or []:
            notes.append(f"- {row}: warning: {warning}")
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def _write(results: dict, name: str) -> Path:
    path = write_results(f"{NAME}_{name}", results)
    (RESULTS_DIR / f"{NAME}_{name}.md").write_text(markdown(results))
    return path


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="float ONNX model (tokenizer.json beside it)")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    parser.add_argument("--limit", type=int, default=None, help="first N eval paragraphs (default: all)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--out", default=None, help="results name: bench/results/recipe_table_NAME.{json,md} "
                        "(default: the model's folder name)")
    parser.add_argument("--workdir", type=Path, default=None, help="where compiled models go (default: a temp "
                        "folder, removed at the end)")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing "
                        "bench/results/recipe_table_NAME.json (needs --out or the same model)")
    parser.add_argument("--ort-gptq-samples", type=int, default=None, help="calibration windows for ORT's GPTQ "
                        "row: the first N of --samples (default: all)")
    parser.add_argument("--skip-slow", action="store_true", help=f"leave out {', '.join(SLOW_ROWS)} "
                        "(ORT's GPTQ runs the model once per calibration sample per distinct MatMul input)")
    args = parser.parse_args(argv)

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows: {unknown} (known: {', '.join(ROWS)})")
    model = Path(args.model).resolve()
    args.model = str(model)
    tokenizer = model.parent / "tokenizer.json"
    if not tokenizer.is_file():
        parser.error(f"no tokenizer.json beside {model}")
    name = args.out or model.parent.name
    if args.render:
        results = json.loads((RESULTS_DIR / f"{NAME}_{name}.json").read_text())
        path = _write(results, name)
        print(markdown(results))
        print(f"rewritten: {path.with_suffix('.md')}")
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qtc-recipe-table-"))
    workdir.mkdir(parents=True, exist_ok=True)

    from qtc.calibration.workloads import get_workload
    from qtc.measure.tasks import get_task
    from qtc.util.cache import sha256_file

    started = time.perf_counter()
    calib, _ = _calibration(args, tokenizer)
    paragraphs = get_task(TASK).units(get_workload(WORKLOAD))[: args.limit or None]
    results: dict = {
        "benchmark": NAME,
        "model": {"path": str(model), "file": model.name, "sha256": sha256_file(model), **graph_facts(model)},
        "settings": {"samples": args.samples, "seq_len": args.seq_len, "limit": args.limit, "rows": rows,
                     "skip_slow": args.skip_slow, "workload": WORKLOAD, "task": TASK, "seed": 0},
        "calibration": calib.provenance(),
        "eval_data": get_workload(WORKLOAD).split_info("eval") | {"units_scored": len(paragraphs)},
        "eval_chars": sum(len(text) for text in paragraphs),
        "machine": machine(),
        "rows": [],
    }
    results["model"]["bytes"] = results["model"]["bytes_on_disk"]
    info = model.parent / "qtc_build.json"
    if info.is_file():
        build = json.loads(info.read_text())
        results["model"].update({"n_params": build.get("n_params"), "config": build.get("config"),
                                 "build_metric": build.get("metric")})
    del calib
    try:
        for row in rows:
            if args.skip_slow and row in SLOW_ROWS:
                results["rows"].append({"row": row, "skipped": "--skip-slow"})
                continue
            print(f"[{NAME}] {row} ...", flush=True)
            entry = run_row(row, args, workdir, tokenizer)
            results["rows"].append(entry)
            if entry["ok"]:
                m = entry["eval"]["metrics"]
                print(f"[{NAME}] {row}: {_ci(m['bits_per_char'], 3)} bits/char, delta "
                      f"{_ci(m.get('delta_bits_per_char'), 4)}, compile {entry.get('compile_seconds')} s, "
                      f"row {entry['row_seconds']} s", flush=True)
                if entry["eval"]["data"].get("sha256") != results["eval_data"]["sha256"]:
                    entry["warning"] = "eval split sha256 differs from the header's"
                cal = entry.get("calibration")
                if cal and cal.get("sha256") != results["calibration"]["sha256"]:
                    entry["warning"] = "calibration sha256 differs from the header's"
            else:
                print(f"[{NAME}] {row} FAILED: {entry['error'][:500]}", file=sys.stderr, flush=True)
            results["total_seconds"] = round(time.perf_counter() - started, 1)
            _write(results, name)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            results["workdir"] = str(workdir)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    path = _write(results, name)
    print()
    print(markdown(results))
    print(f"written: {path} and {path.with_suffix('.md')}")
    return 0 if all(e.get("ok") or e.get("skipped") for e in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
