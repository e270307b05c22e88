"""Budget-gated layer skipping on one model: compile float / w8a8 / w4a8 with --layer-skip, then `qtc sweep` them
all (bits/char with paired intervals vs the float model, ORT CPU latency, realized sparsity) beside the static
one-shot ShortGPT table at the same budgets. Writes bench/results/layerskip-<name>.{json,png} and keeps the
compiled models in --workdir (reused when present, so a sweep can be re-run alone).

    QTC_THREADS=1 nice -n 10 python bench/layer_skip.py MODEL_ONNX --name zh-tiny-lm [--recipes float,w8a8]
        [--budgets 1.0,0.9,0.8,0.7] [--metric loss] [--samples 64] [--seq-len 256] [--limit 200] [--runs 30]
        [--table-from float]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import RESULTS_DIR  # noqa: E402

import qtc  # noqa: E402
from qtc.cli.options import parse_budgets  # noqa: E402
from qtc.measure.sweep import sweep, write  # noqa: E402
from qtc.passes.layerskip import LayerSkipSpec  # noqa: E402

FLOAT_RECIPE = "base: w8a16\nname: float\ndescription: nothing quantized (the float model, gated)\nop_types: []\n"


def dense_check(args, workdir: Path, compiled: list[Path]) -> int:
    """budget=1.0 (the default) against the same recipe compiled without gates, on held-out windows."""
    import numpy as np

    from qtc.backends import get_backend
    from qtc.calibration.data import load_calibration, model_inputs
    from qtc.frontends.onnx_file import load_model

    backend = get_backend("cpu")
    calib = load_calibration("zh-news", tokenizer=args.model.parent / "tokenizer.json", n_samples=1, seq_len=args.seq_len)
    rows = {}
    for gated in compiled:
        recipe = gated.name.split(".")[-3]
        plain = workdir / f"{args.name}.{recipe}.onnx"
        if not plain.is_file():
            qtc.compile(args.model, recipe=workdir / "float.yaml" if recipe == "float" else recipe, calib="zh-news",
                        samples=args.samples, seq_len=args.seq_len).save(plain)
        feeds = list(calib.feeds(model_inputs(load_model(plain)), heldout=True))
        a, b = backend.session(plain), backend.session(gated)
        diff = max(float(np.abs(a.run(None, f)[0] - b.run(None, f | {"budget": np.array(1.0, np.float32)})[0]).max())
                   for f in feeds)
        rows[recipe] = {"max_abs_diff": diff, "windows": len(feeds), "tokens_per_window": args.seq_len}
        print(f"{recipe}: budget=1.0 vs ungated, max |diff| {diff:.3g} over {len(feeds)} held-out windows", flush=True)
    (RESULTS_DIR / f"layerskip-{args.name}-dense-check.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--recipes", default="float,w8a8")
    parser.add_argument("--budgets", default="1.0,0.9,0.8,0.7")
    parser.add_argument("--metric", default="loss")
    parser.add_argument("--loss-windows", type=int, default=16)
    parser.add_argument("--unit", default="branches")
    parser.add_argument("--loss-candidates", type=int, default=12)
    parser.add_argument("--table-from", default=None, metavar="RECIPE",
                        help="calibrate the skip table on this recipe's build only (listed first in --recipes) and "
                             "reuse it for the others (--skip-table-from)")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--dense-check", action="store_true",
                        help="only compile each recipe without gates too and compare budget=1.0 with it")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or RESULTS_DIR / f"layerskip-{args.name}-models"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "float.yaml").write_text(FLOAT_RECIPE)
    budgets = parse_budgets(args.budgets)
    spec = LayerSkipSpec(budgets=budgets, metric=args.metric, unit=args.unit, loss_windows=args.loss_windows,
                         loss_candidates=args.loss_candidates)
    compiled = []
    source = workdir / f"{args.name}.{args.table_from}.skip.onnx" if args.table_from else None
    for recipe in args.recipes.split(","):
        out = workdir / f"{args.name}.{recipe}.skip.onnx"
        if not out.is_file():
            reuse = source is not None and recipe != args.table_from
            result = qtc.compile(args.model, recipe=workdir / "float.yaml" if recipe == "float" else recipe,
                                 calib="zh-news", samples=args.samples, seq_len=args.seq_len,
                                 layer_skip=dataclasses.replace(spec, table_from=source) if reuse else spec)
            result.save(out)
            print(f"{recipe}: compiled in {result.report['compile_seconds']:.0f} s; "
                  f"{json.dumps(result.report['layer_skip']['realized'])}", flush=True)
        compiled.append(out)
    if args.dense_check:
        return dense_check(args, workdir, compiled)
    if args.compile_only:
        return 0
    result = sweep(compiled, list(budgets), "zh-news-ppl", baseline=args.model, limit=args.limit, runs=args.runs)
    result["source_model"] = str(args.model)
    result["compile_reports"] = {p.name: json.loads(p.with_name(p.stem + ".qtc.json").read_text()).get("layer_skip")
                                 for p in compiled}
    json_path, png_path = write(result, RESULTS_DIR / f"layerskip-{args.name}")
    metric = result["metric"]
    for row in result["rows"]:
        m, d = row["metrics"][metric], row["metrics"].get(f"delta_{metric}")
        print(f"{row['model']:32s} {row['method']:16s} {row['budget']:4g}  skip {len(row['skipped']):2d} "
              f"({row['compute_sparsity']:5.1%})  {metric} {m['value']:.4f} [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]"
              + (f"  delta {d['value']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else "")
              + f"  {row['latency_ms']:8.2f} ms  x{row['latency_vs_dense']:.3f}")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
