"""Activation-range coverage: how much of what a model computes on served text falls outside the ranges its
calibration text produced (the token audit's question, asked of the activations a recipe quantizes).

The model is prepared as `qtc compile` prepares it (canonicalized, fused for the target, annotated by the recipe),
and the activations the recipe would calibrate are streamed twice on the target's runtime: over the calibration
windows (each activation's min / max: the range a min/max calibrator would give it), then over windows of the
served text, counting per activation the values outside that range. A clipped share of 1 % means one value in a
hundred would saturate its int8 grid on the served text; percentile and MSE calibrators clip more than min/max by
design, so this is the lower bound of what a static recipe clips. Both streams run one window at a time (memory
flat in samples); a KV decoder's windows include their decode steps, as in calibration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from qtc.backends import compile_target
from qtc.calibration.data import load_calibration, served_calibration
from qtc.errors import QtcError
from qtc.frontends.onnx_file import load_model
from qtc.passes.annotate import AnnotateQuantizationPass, activations_to_observe
from qtc.passes.calibrate import stream_activations
from qtc.passes.canonicalize import canonicalize_passes
from qtc.passes.fusion import FuseOperatorsPass
from qtc.recipes import load_recipe

CLIP_WARN = 0.001  # a served activation with more than 0.1 % of its values outside the calibration range
WORST = 10


class _Range:
    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf

    def update(self, x: np.ndarray) -> None:
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))


class _Clipped:
    """Served values outside a fixed range, counted, and the served range itself."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.outside = self.total = 0
        self.range = _Range()

    def update(self, x: np.ndarray) -> None:
        self.outside += int(np.count_nonzero((x < self.lo) | (x > self.hi)))
        self.total += x.size
        self.range.update(x)


def _observed(model: ir.Model, recipe: str, target: str) -> dict[str, str]:
    """{activation name: the first layer reading it} for every activation `recipe` quantizes statically."""
    ir.passes.PassManager([*canonicalize_passes(load_recipe(recipe).opset), FuseOperatorsPass(target),
                           AnnotateQuantizationPass(load_recipe(recipe))])(model)
    wanted = activations_to_observe(model.graph)
    if not wanted:
        raise QtcError(f"recipe {recipe} quantizes no activation statically: nothing to cover")
    names = {}
    for value, _ in wanted.values():
        readers = sorted(node.name for node, _ in value.uses())
        names[value.name] = readers[0] if readers else value.name
    return dict(sorted(names.items()))


def activation_coverage(model_path: Path, calib: str, against: str, tokenizer: Path, *, recipe: str = "w8a8",
                        target: str = "cpu", samples: int = 8, seq_len: int = 256, seed: int = 0,
                        quiet: bool = False) -> dict:
    """Per quantized activation: the calibration range, the served range and the share of served values outside
    the calibration range; the worst activations first."""
    model = load_model(model_path)
    names = _observed(model, recipe, target)
    backend = compile_target(target).measuring_backend()
    calib_set = load_calibration(calib, tokenizer=tokenizer, n_samples=samples, seq_len=seq_len, seed=seed)
    served_set = served_calibration(against, tokenizer, samples, seq_len, seed)
    ranges = {name: _Range() for name in names}
    for produced in stream_activations(model, backend, calib_set, set(names), "coverage: calibration ranges", quiet):
        for name, x in produced.items():
            ranges[name].update(x)
    clipped = {name: _Clipped(r.lo, r.hi) for name, r in ranges.items()}
    for produced in stream_activations(model, backend, served_set, set(names), "coverage: served text", quiet):
        for name, x in produced.items():
            clipped[name].update(x)
    rows = [_row(name, names[name], clipped[name]) for name in names]
    rows.sort(key=lambda r: (-r["clipped_share"], r["activation"]))
    shares = np.array([r["clipped_share"] for r in rows])
    return {
        "recipe": recipe, "target": target, "calibrator": "minmax",
        "calibration": calib_set.source, "served": served_set.source, "samples": samples, "seq_len": seq_len,
        "seed": seed, "activations": len(rows),
        "clipped_share_mean": round(float(shares.mean()), 6), "clipped_share_max": round(float(shares.max()), 6),
        "activations_clipping": int((shares > CLIP_WARN).sum()), "clip_warn": CLIP_WARN,
        "worst": rows[:WORST], "rows": rows,
    }


def _row(name: str, layer: str, c: _Clipped) -> dict:
    calib_width = max(abs(c.lo), abs(c.hi))
    served_width = max(abs(c.range.lo), abs(c.range.hi))
    return {"activation": name, "layer": layer, "calibration_range": [c.lo, c.hi],
            "served_range": [c.range.lo, c.range.hi],
            "served_over_calibration": round(served_width / calib_width, 4) if calib_width > 0 else None,
            "clipped_share": round(c.outside / c.total, 6) if c.total else 0.0}


def coverage_warnings(result: dict) -> list[str]:
    if not result["activations_clipping"]:
        return []
    worst = result["worst"][0]
    return [f"{result['activations_clipping']} of {result['activations']} quantized activations clip more than "
            f"{result['clip_warn']:.1%} of their served values at the calibration ranges (worst: {worst['layer']}, "
            f"{worst['clipped_share']:.2%})"]
