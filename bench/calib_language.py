"""Calibrated on English prose vs Chinese news, evaluated on Chinese news: the table issue 17 asks for, one model.

    nice python bench/calib_language.py DECODER/model.onnx --name gemma-3-270m \
        [--recipes w8a8-sq-down16,w8a8-dynamic,w4a16-mlp8-awq,w4a8-gptq] [--samples 16] [--limit 30] [--work DIR]

Steps, each the CLI a user runs (this script only tabulates):
1. `qtc table MODEL --recipes R --calib zh-news,en-pydoc -o WORK/NAME`: every recipe compiled on each calibration
   text and scored on the first --limit zh-news-ppl eval paragraphs against the float model (paired intervals);
   finished cells are kept, so a rerun resumes (the evaluations and audits below are kept beside them too);
2. `qtc eval EN_CELL --baseline ZH_CELL`: the English-calibrated model against its Chinese-calibrated twin on the
   same paragraphs, the paired delta the question is about;
3. `qtc audit-calib --calib C --against zh-news --model MODEL --samples 8` per calibration text: token coverage
   (unseen share, unigram KL, CJK share) and activation coverage (share of served values outside the calibration
   min/max ranges of the w8a8 activations).
Writes bench/results/calib_language_NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESULTS_DIR, machine, qtc_json  # noqa: E402

CALIBS = ("zh-news", "en-pydoc")


def _ci(metric: dict, digits: int = 3) -> str:
    lo, hi = metric["ci95"]
    return f"{metric['value']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def markdown(name: str, cells: dict, pairs: dict, audits: dict, args) -> str:
    lines = [f"# {name}: calibrated on English vs Chinese, evaluated on Chinese news", "",
             f"`python bench/calib_language.py` (this file's protocol): {args.samples} x {args.seq_len} calibration "
             f"windows of each text, bits/char on the first {args.limit} zh-news-ppl eval paragraphs.", "",
             "| calibration text | served tokens unseen | unigram KL bits/token | CJK share | w8a8 activations clipping > 0.1 % "
             "| mean share of served values clipped |", "|---|---:|---:|---:|---:|---:|"]
    for calib in CALIBS:
        a = audits[calib]
        c = a["activation_coverage"]
        lines.append(f"| {calib} (sha256 {a['calibration']['sha256'][:12]}) | {a['unseen_token_share']:.1%} | "
                     f"{a['unigram_kl_bits']:.2f} | {a['calibration']['scripts']['cjk']:.0%} | "
                     f"{c['activations_clipping']} of {c['activations']} | {c['clipped_share_mean']:.2e} |")
    lines += ["", "| recipe | Δ bits/char vs float, zh-news calibration | Δ vs float, en-pydoc calibration | "
              "en-pydoc minus zh-news (paired) [95% CI] | top-1 zh / en |", "|---|---:|---:|---:|---:|"]
    for recipe in args.recipes.split(","):
        zh, en = cells[(recipe, "zh-news")], cells[(recipe, "en-pydoc")]
        pair = "0 (identical bytes)" if pairs[recipe].get("identical_bytes") else \
            _ci(pairs[recipe]["metrics"]["delta_bits_per_char"])
        top1 = f"{zh['metrics']['top1_agreement']['value']:.1%} / {en['metrics']['top1_agreement']['value']:.1%}"
        lines.append(f"| {recipe} | {_ci(zh['metrics']['delta_bits_per_char'])} | "
                     f"{_ci(en['metrics']['delta_bits_per_char'])} | {pair} | {top1} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--recipes", default="w8a8-sq-down16,w8a8-dynamic,w4a16-mlp8-awq,w4a8-gptq")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("out/calib_language"))
    args = parser.parse_args()
    prefix = args.work / args.name
    grid = qtc_json("table", str(args.model), "--recipes", args.recipes, "--calib", ",".join(CALIBS), "--samples",
               str(args.samples), "--seq-len", str(args.seq_len), "--limit", str(args.limit), "-o", str(prefix))
    cells = {(c["recipe"], c["calib"]): c for c in grid["cells"]}
    folder = Path(f"{prefix}.cells")
    pairs = {}
    for recipe in args.recipes.split(","):
        if cells[(recipe, "en-pydoc")]["data_sha256"] == cells[(recipe, "zh-news")]["data_sha256"]:
            pairs[recipe] = {"identical_bytes": True}  # the recipe reads no calibration data (w8a8-dynamic)
            continue
        pairs[recipe] = qtc_json("eval", str(folder / f"{recipe}@en-pydoc" / "model.onnx"), "--task", "zh-news-ppl",
                            "--baseline", str(folder / f"{recipe}@zh-news" / "model.onnx"), "--limit", str(args.limit),
                            keep=Path(f"{prefix}.pairs") / f"{recipe}.json")
    audits = {calib: qtc_json("audit-calib", "--calib", calib, "--against", "zh-news", "--model", str(args.model),
                         "--samples", "8", keep=Path(f"{prefix}.audits") / f"{calib}.json") for calib in CALIBS}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    protocol = {"samples": args.samples, "seq_len": args.seq_len, "limit": args.limit, "machine": machine()}
    (RESULTS_DIR / f"calib_language_{args.name}.json").write_text(json.dumps(
        {"protocol": protocol, "cells": grid["cells"], "pairs": pairs,
         "audits": {c: {k: v for k, v in a.items() if k != "activation_coverage"} | {
             "activation_coverage": {k: v for k, v in a["activation_coverage"].items() if k != "rows"}}
             for c, a in audits.items()}}, indent=1))
    text = markdown(args.name, cells, pairs, audits, args)
    (RESULTS_DIR / f"calib_language_{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
