"""Sensitivity-driven mixed precision (`qtc compile --max-drop METRIC=VALUE`).

Rank layers by SQNR (`qtc.analyze`), then keep the k most sensitive ones in higher precision for k = 0, 1, 2,
4, 8, ... until the held-out comparison meets the budget. Higher precision means w8a16 (int8 weights, float
activations); layers of a recipe that is already weight-only int8 stay in float. The attempts share one
`CalibrationCache` (qtc.passes.calibrate): only the first streams the calibration windows (see `qtc.compile_within`).
"""

from __future__ import annotations

import dataclasses

from qtc.errors import QtcError
from qtc.recipes import Recipe, Rule, builtin_recipe

METRICS = {
    "top1": ("drop in top-1 agreement with float", lambda s: 1.0 - s["top1_agreement"]),
    "kl": ("mean KL(float || compiled) per position", lambda s: s["kl_per_position"]),
    "cosine": ("1 - cosine to float logits", lambda s: 1.0 - s["cosine"]),
}


def measured_drop(report: dict, metric: str) -> float:
    outputs = report.get("heldout_comparison", {}).get("outputs", {})
    logits = next((stats for name, stats in outputs.items() if "top1_agreement" in stats), None)
    if logits is None:
        raise QtcError("--max-drop needs a logits output and held-out text to measure against")
    return float(METRICS[metric][1](logits))


def with_fallback(recipe: Recipe, nodes: list[str]) -> Recipe:
    """The recipe plus node rules that keep `nodes` in higher precision (node rules win over everything)."""
    safer = builtin_recipe("w8a16")
    already_safe = recipe.activation is None and recipe.weight.dtype == "int8"
    rules = tuple(
        Rule("node", name, quantize=False) if already_safe else Rule("node", name, weight=safer.weight, activation=None)
        for name in nodes
    )
    return dataclasses.replace(recipe, rules=recipe.rules + rules)


def fallback_sizes(n_layers: int) -> list[int]:
    sizes, k = [0], 1
    while k < n_layers:
        sizes.append(k)
        k *= 2
    return sizes + [n_layers]
