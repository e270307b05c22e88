"""`qtc parity`: does this model compute the same thing on every backend, and close enough to another model?

Each requested backend runs the model on the same held-out inputs; its outputs are compared with the reference
backend's (default cpu). With `against`, a second model (the float original, or a known-good build) runs on the
reference backend and is compared with this one. A backend that is not available is reported as such with the
loader's reason, and its numbers are never filled in from another backend.

Default tolerances (`DEFAULT_TOLERANCES`), and why:
- across backends, same model: kernels differ only in summation order and fused-op implementations, so
  logits cosine >= 0.9999 and top-1 agreement >= 0.99 (int8 kernels may round a few ties differently);
- against the float original: the quantization error itself is measured, so the bound follows the recipe:
  weight-only int8 keeps cosine >= 0.995 / top-1 >= 0.95; int8 activations (w8a8) cosine >= 0.99 / top-1 >= 0.90;
  4-bit weights cosine >= 0.95 / top-1 >= 0.80. A model with no qtc recipe is held to the float bound.
A broken build (a scale off by 10x) lands far outside all of these.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from qtc.backends import get_backend
from qtc.backends.base import BackendUnavailable
from qtc.backends.compare import OutputStats
from qtc.calibration.data import DECODE_STEPS, InputSpec, decode_steps, load_calibration, model_inputs, tokenizer_beside
from qtc.errors import QtcError
from qtc.frontends.onnx_file import load_model

CROSS_BACKEND = {"cosine": 0.9999, "top1_agreement": 0.99}
DEFAULT_TOLERANCES = {
    "float": {"cosine": 0.9999, "top1_agreement": 0.99},
    "int8-weights": {"cosine": 0.995, "top1_agreement": 0.95},
    "int8-activations": {"cosine": 0.99, "top1_agreement": 0.90},
    "int4-weights": {"cosine": 0.95, "top1_agreement": 0.80},
}


def tolerance_class(metadata: dict[str, str]) -> str:
    recipe = json.loads(metadata.get("qtc.recipe", "null"))
    if not recipe:
        return "float"
    if recipe["weight"]["dtype"] in ("int4", "uint4"):
        return "int4-weights"
    return "int8-activations" if recipe.get("activation") else "int8-weights"


def _run_all(session, feeds: list[dict], inputs: list[InputSpec]) -> list[dict[str, np.ndarray]]:
    """Outputs for each feed; a KV-cache decoder runs each window as a prefill and then one-token decode steps on
    its own cache (calibration/data.py:decode_steps), so that every step's logits are compared, not only prefill's."""
    names = [o.name for o in session.get_outputs()]
    # An --against model may lack e.g. a layer-skip `budget` input; inputs with a default are "overridable
    # initializers" to ORT, not among get_inputs().
    accepted = {i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]}

    def run(feed: dict) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {k: v for k, v in feed.items() if k in accepted})))

    if not any(spec.present for spec in inputs):
        return [run(feed) for feed in feeds]
    return [outputs for feed in feeds for _, outputs in decode_steps(feed, inputs, run)]


def _compare(reference: list[dict], candidate: list[dict]) -> dict:
    stats: dict[str, OutputStats] = {}
    for ref_out, cand_out in zip(reference, candidate):
        for name, ref in ref_out.items():
            if name in cand_out:
                stats.setdefault(name, OutputStats()).update(ref, cand_out[name], logits="logit" in name)
    return {name: s.result() for name, s in stats.items()}


def _verdict(outputs: dict, tolerance: dict) -> list[str]:
    failures = []
    for name, stats in outputs.items():
        for metric, bound in tolerance.items():
            if metric in stats and stats[metric] < bound:
                failures.append(f"{name}: {metric} {stats[metric]:.6f} < {bound}")
    return failures


def _feeds(model_path: Path, model, inputs: str, tokenizer: str | None, samples: int, seq_len: int) -> list[dict]:
    tokenizer_path = Path(tokenizer) if tokenizer else tokenizer_beside(model_path)
    calib = load_calibration(inputs, tokenizer=tokenizer_path, n_samples=1, seq_len=seq_len, seed=0)
    return list(calib.feeds(model_inputs(model), heldout=True))[:samples]


def scalar_feeds(model, values: dict[str, float] | None) -> dict[str, np.ndarray]:
    """Extra scalar inputs for every run (e.g. a layer-skip model's `budget`), typed as the model declares them."""
    if not values:
        return {}
    declared = {v.name: v for v in model.graph.inputs}
    feeds = {}
    for name, value in values.items():
        if name not in declared:
            raise QtcError(f"--feed {name}: the model has no input {name!r} (it has {', '.join(sorted(declared))})")
        dtype = declared[name].dtype.numpy() if declared[name].dtype is not None else np.float32
        feeds[name] = np.array(value, dtype=dtype)
    return feeds


def parity(
    model: str | os.PathLike,
    backends: list[str],
    *,
    reference: str = "cpu",
    against: str | os.PathLike | None = None,
    inputs: str = "zh-news",
    tokenizer: str | None = None,
    samples: int = 4,
    seq_len: int = 128,
    tolerance: dict | None = None,
    feed: dict[str, float] | None = None,
) -> dict:
    """Run MODEL on each backend (and AGAINST on the reference backend); returns figures and a verdict."""
    path = Path(model)
    loaded = load_model(path)  # once: metadata, declared inputs, and what the held-out feeds must hold
    metadata = dict(loaded.metadata_props)
    extra = scalar_feeds(loaded, feed)
    feeds = [f | extra for f in _feeds(path, loaded, inputs, tokenizer, samples, seq_len)]
    if not feeds:
        raise QtcError(f"no held-out inputs from {inputs}")
    ref_backend = get_backend(reference)
    ok, why = ref_backend.availability()
    if not ok:
        raise QtcError(f"reference backend {reference} is unavailable: {why}")
    specs = model_inputs(loaded)
    ref_outputs = _run_all(ref_backend.session(path), feeds, specs)
    result = {"model": path.name, "reference": reference, "inputs": inputs, "samples": len(feeds),
              "decode_steps": DECODE_STEPS if any(spec.present for spec in specs) else 0,
              "feed": {k: float(v) for k, v in extra.items()},
              "recipe_class": tolerance_class(metadata), "backends": {}, "failures": []}
    for name in backends:
        backend = get_backend(name)
        entry = {"provider": backend.provider, "provider_options": backend.provider_options}
        available, why = backend.availability()
        if available and name != reference:
            try:
                entry["outputs"] = _compare(ref_outputs, _run_all(backend.session(path), feeds, specs))
            except BackendUnavailable as exc:
                available, why = False, str(exc)
            except Exception as exc:  # noqa: BLE001 - ORT's run errors: this backend failed, the report goes on
                available, why = False, f"run failed: {' '.join(str(exc).split())[:300]}"
        entry |= {"available": available, "reason": why}
        if "outputs" in entry:
            bound = tolerance or CROSS_BACKEND
            entry["tolerance"] = bound
            result["failures"] += [f"{name} vs {reference}: {f}" for f in _verdict(entry["outputs"], bound)]
        result["backends"][name] = entry
    if against is not None:
        other = Path(against)
        bound = tolerance or DEFAULT_TOLERANCES[result["recipe_class"]]
        outputs = _compare(_run_all(ref_backend.session(other), feeds, model_inputs(load_model(other))), ref_outputs)
        result["against"] = {"model": other.name, "backend": reference, "outputs": outputs, "tolerance": bound}
        result["failures"] += [f"vs {other.name}: {f}" for f in _verdict(outputs, bound)]
    result["passed"] = not result["failures"]
    return result
