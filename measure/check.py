"""The post-compile check: before a compiled model is handed back, it runs on a feed its source runs on and is
compared with the source. A model that fails to run, changes an output's shape, or turns finite outputs into
NaN / inf is an error (never a written file); one that runs but lands below the recipe class's floor is too.

The feed is derived from the source's inputs: token inputs get random ids below the embedding's row count (and
the usual mask, positions and empty KV cache, as text is fed); other inputs get seeded random values of their
dtype with symbolic dims set to 1 (the first) and 8 (the rest). When the source itself cannot run on that feed
(a model whose dims must agree in ways the graph does not say), the check is skipped and the report says why.

The floor is deliberately a broken-build bound, not an accuracy one: random inputs sit outside the calibrated
ranges, so a sound w8a8 model can score lower here than on real text; accuracy is the held-out comparison's job.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qtc.backends.base import Backend
from qtc.backends.compare import compare_models
from qtc.calibration.data import InputSpec, embedding_rows, model_inputs, text_feed, token_input
from qtc.errors import QtcError

SEQ = 8
FLOORS = {"float": 0.999, "int8-weights": 0.98, "int8-activations": 0.8, "int4-weights": 0.8}


def random_feed(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = model_inputs(model)
    integer = [s for s in inputs if np.issubdtype(s.dtype, np.integer)]
    if integer:
        try:
            token = token_input(inputs)
        except QtcError:
            token = None
        if token is not None:
            vocab = embedding_rows(model) or 2
            try:
                return text_feed(rng.integers(0, vocab, size=SEQ, dtype=np.int64), inputs)
            except QtcError:
                pass  # inputs text cannot fill: random values per dtype below
    return {spec.name: _random(spec, rng) for spec in inputs}


def _random(spec: InputSpec, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(d if d is not None else (1 if i == 0 else SEQ) for i, d in enumerate(spec.shape))
    if spec.dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(spec.dtype, np.integer):
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)


def check_compiled(backend: Backend, source, compiled: ir.Model, feed: dict[str, np.ndarray], recipe_class: str) -> dict:
    """Run both on `feed` (random_feed of the source); QtcError when the compiled model fails, else figures."""
    try:
        backend.session(source).run(None, feed)
    except Exception as exc:  # noqa: BLE001 - ORT's errors: the source cannot run on a derived feed
        _loads(backend, compiled)  # still: what is handed back must at least load
        return {"skipped": f"the source does not run on a derived feed ({' '.join(str(exc).split())[:200]})"}
    try:
        outputs = compare_models(backend, source, compiled, [feed])["outputs"]
    except Exception as exc:  # noqa: BLE001 - the compiled model does not run where its source does
        raise QtcError(f"the compiled model fails on an input its source runs on: {' '.join(str(exc).split())[:400]}") from None
    floor = FLOORS[recipe_class]
    for name, stats in outputs.items():
        if not np.isfinite(stats["cosine"]):
            raise QtcError(f"the compiled model's output {name!r} is not finite on an input its source runs on")
    # A decoder's KV caches are intermediate state (a 4-bit value cache on random tokens can sit near the floor
    # while the logits agree): judge the logits where there are logits, every output elsewhere.
    judged = {n: s for n, s in outputs.items() if "top1_agreement" in s} or outputs
    for name, stats in judged.items():
        if stats["cosine"] < floor:
            raise QtcError(f"the compiled model's output {name!r} has cosine {stats['cosine']:.4f} to its source on "
                           f"a derived input, below the {recipe_class} floor {floor}: a broken build")
    return {"feed": {k: list(v.shape) for k, v in feed.items()}, "floor": floor,
            "cosine": {name: round(stats["cosine"], 6) for name, stats in outputs.items()}}


def _loads(backend: Backend, compiled: ir.Model) -> None:
    try:
        backend.session(compiled)
    except Exception as exc:  # noqa: BLE001 - ORT's load errors
        raise QtcError(f"the compiled model does not load in ONNX Runtime: {' '.join(str(exc).split())[:400]}") from None
