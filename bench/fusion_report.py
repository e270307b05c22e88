"""Fusion counts per rule and target, each rule's max |output difference| (fused vs unfused, ORT CPU, held-out
zh-news windows), and the `cann` legalization check: whitelisted ops only, float outputs equal to the
unlegalized model on ORT CPU.

    python -m qtc.bench.fusion_report MODEL.onnx [MODEL.onnx ...] [--feeds 2] [--tokens 128]

Results: bench/results/fusion_report.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx_ir as ir
from _util import write_results

from qtc.backends.cann import offending_nodes, placement
from qtc.backends.compare import compare_models
from qtc.backends.cpu import CPU
from qtc.calibration.data import load_calibration, model_inputs
from qtc.frontends.onnx_file import load_model
from qtc.measure.fusions import measure_fusions
from qtc.passes.canonicalize import canonicalize_passes
from qtc.passes.fusion import FuseOperatorsPass, fusion_counts
from qtc.passes.legalize import legalization_passes
from qtc.passes.meta import LEGALIZATION as LEGALIZATION_META

TARGETS = ("cpu", "cuda", "cann")


def per_rule(path: Path, feeds: list[dict]) -> dict:
    """Each rule alone vs unfused, on ORT CPU: the cpu and cuda forms at opset 21 (cuda's MultiHeadAttention runs
    on ORT CPU's own kernel) and the cpu forms at opset 23 (standard RotaryEmbedding / Attention)."""
    out = {}
    for target, opset in (("cpu", 21), ("cuda", 21), ("cpu", 23)):
        model = load_model(path)
        ir.passes.PassManager(canonicalize_passes(opset))(model)
        out[f"{target}@{opset}"] = measure_fusions(model, target, feeds)
    return out


def report_model(path: Path, n_feeds: int, tokens: int) -> dict:
    model = load_model(path)
    ir.passes.PassManager(canonicalize_passes(21))(model)
    calib = load_calibration("zh-news", tokenizer=path.parent / "tokenizer.json", n_samples=1, seq_len=tokens, seed=0)
    feeds = list(calib.feeds(model_inputs(model), heldout=True))[:n_feeds]
    result = {"feeds": len(feeds), "tokens": tokens, "per_rule": per_rule(path, feeds), "counts": {}}
    # In memory (after per_rule, which loads its own copies: gemma-3-270m peaks at ~8 GB), so that the copies
    # below need no base folder.
    ir.external_data.load_to_model(model)
    for target in TARGETS:
        copy = ir.from_proto(ir.to_proto(model))
        FuseOperatorsPass(target)(copy)
        result["counts"][target] = {k: v["in_graph"] for k, v in fusion_counts(copy)["fusions"].items()}
        if target == "cpu":
            result["all_fusions_cpu"] = compare_models(CPU, model, copy, feeds)["outputs"]
    legal = ir.from_proto(ir.to_proto(model))
    ir.passes.PassManager([FuseOperatorsPass("cann"), *legalization_passes(allow_fallback=True)])(legal)
    result["cann"] = {
        "legalization": legal.meta[LEGALIZATION_META],
        "offending": offending_nodes(legal),
        "vs_unlegalized_cpu": compare_models(CPU, model, legal, feeds)["outputs"],
        "placement": {mode: placement(legal, mode) for mode in ("graph", "single_op")},
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--feeds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    results = {}
    for path in args.models:
        results[path.parent.name] = report_model(path, args.feeds, args.tokens)
        print(path.parent.name, json.dumps(results[path.parent.name], indent=1), flush=True)
    write_results("fusion_report", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
