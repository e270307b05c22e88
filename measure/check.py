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

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from qtc.backends import get_backend
from qtc.backends.base import Backend
from qtc.backends.compare import OutputStats, compare_models, cosine, session_with_outputs
from qtc.calibration.data import InputSpec, embedding_rows, model_inputs, prefill_for, text_feed, token_input
from qtc.errors import QtcError
from qtc.frontends.onnx_file import load_model, tensor_bytes
from qtc.util.spill import peak_rss

SEQ = 8
REFERENCE_MAX_BYTES = 64 << 20  # onnx.reference runs in numpy: only small sources are worth its time
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
        if token is not None and (not token.shape or token.shape[0] in (None, 1)):  # text feeds are batch 1
            vocab = embedding_rows(model) or 2
            length = token.shape[1] if len(token.shape) == 2 and token.shape[1] is not None else SEQ  # static exports
            try:
                return text_feed(rng.integers(0, vocab, size=length, dtype=np.int64), inputs)
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


def check_large(backend: Backend, compiled: ir.Model, feed: dict[str, np.ndarray], source_bytes: int, limit: int) -> dict:
    """The check of a model whose float source is over half the memory limit: the source is not run (it would
    not fit beside the compiled model); the compiled model is, in a child process (its ORT session is as large as
    its weights, which are not in this process's budget), on the same derived feed, and must return every output
    finite, with the shapes it declares. QtcError otherwise."""
    feed = prefill_for(model_inputs(compiled), feed)  # windowed caches take their W-row buffers
    with tempfile.TemporaryDirectory(prefix="qtc-check-") as folder:
        model_path, feed_path, out_path = Path(folder) / "model.onnx", Path(folder) / "feed.npz", Path(folder) / "out.npz"
        ir.save(compiled, model_path, external_data="model.onnx.data")
        np.savez(feed_path, **feed)
        done = subprocess.run([sys.executable, "-m", "qtc.measure.check", str(model_path), str(feed_path), str(out_path),
                               backend.name], capture_output=True, text=True)
        if done.returncode != 0:
            raise _fails(RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode))
        child_peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"] if done.stdout.strip() else None
        with np.load(out_path) as outputs:
            finite = {name: bool(np.isfinite(outputs[name]).all()) for name in outputs.files}
            shapes = {name: list(outputs[name].shape) for name in outputs.files}
    broken = sorted(name for name, ok in finite.items() if not ok)
    if broken:
        raise QtcError(f"the compiled model's output {broken[0]!r} is not finite on a derived input")
    return {"feed": {k: list(v.shape) for k, v in feed.items()}, "source_run_by": None,
            "skipped_source": f"the float source ({source_bytes / 1e9:.1f} GB of weights) is over half the memory limit "
                              f"({limit / 1e9:.1f} GB): not run; the compiled model ran in a child process",
            "compiled_outputs": shapes, "child_peak_rss_bytes": child_peak}


def run_in_child(model: str, feed: str, out: str, backend_name: str) -> None:
    """`python -m qtc.measure.check MODEL FEED.npz OUT.npz BACKEND`: run one feed, save every output."""
    session = get_backend(backend_name).session(model)
    with np.load(feed) as data:
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {k: data[k] for k in data.files})))
    np.savez(out, **values)
    print(json.dumps({"peak_rss_bytes": peak_rss()}))  # the parent reports what loading the compiled model took


def check_compiled(backend: Backend, source, compiled: ir.Model, feed: dict[str, np.ndarray], recipe_class: str) -> dict:
    """Run both on `feed` (random_feed of the source); QtcError when the compiled model fails, else figures.

    Where ONNX Runtime cannot run the source itself (operators of old opsets it no longer implements, e.g.
    AveragePool-1, BatchNormalization-6), a small source is run by ONNX's own reference implementation instead."""
    judge = "onnxruntime"
    try:
        session = backend.session(source)
    except Exception as exc:  # noqa: BLE001 - this ORT build or machine cannot load the source at all
        session, load_error = None, " ".join(str(exc).split())
    try:
        if session is None:
            raise RuntimeError(load_error)
        session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - ORT's errors: the source cannot run on a derived feed
        reason = " ".join(str(exc).split())[:200]
        expected = _reference_outputs(source, feed)
        if session is None:
            _loads(backend, compiled, also_source=load_error)
        if expected is None:
            _loads(backend, compiled)  # still: what is handed back must at least load
            return {"skipped": f"the source does not run on a derived feed ({reason})"}
        judge = f"onnx.reference (onnxruntime cannot run the source: {reason[:120]})"
        outputs = _compare_with(expected, backend, compiled, feed)
    else:
        try:
            outputs = compare_models(backend, source, compiled, [feed])["outputs"]
        except OSError as exc:  # the source's outputs go to a temporary folder first: a full disk, not the model
            raise QtcError(f"cannot write temporary files for the post-compile check: {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - the compiled model does not run where its source does
            raise _fails(exc) from None
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
                           f"a derived input, below the {recipe_class} floor {floor}: a broken build"
                           + first_divergence(backend, source, compiled, feed, floor))
    return {"feed": {k: list(v.shape) for k, v in feed.items()}, "floor": floor, "source_run_by": judge,
            "cosine": {name: round(stats["cosine"], 6) for name, stats in outputs.items()}}


def first_divergence(backend: Backend, source, compiled: ir.Model, feed: dict[str, np.ndarray], floor: float) -> str:
    """Where a failing build starts to disagree: the first value, in the source's node order, that the compiled
    graph still produces under the same name and whose cosine to the source's falls below the floor; ' (first
    below the floor: ...)' naming it and its node, or '' when no shared value does (the divergence is inside
    rewritten nodes). Runs only on the failure path: it exposes every shared value as an output of both."""
    reference = _as_model(source)
    produced = {v.name for node in compiled.graph for v in node.outputs}
    order = [(node, v.name) for node in reference.graph for v in node.outputs
             if v.name in produced and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)]
    names = [name for _, name in order]
    try:
        ours = dict(zip(names, session_with_outputs(backend, reference, names).run(names, feed)))
        theirs = dict(zip(names, session_with_outputs(backend, compiled, names).run(names, feed)))
    except Exception:  # noqa: BLE001 - ORT's errors: the outputs message stands without the location
        return ""
    for node, name in order:
        if ours[name].shape == theirs[name].shape and cosine(ours[name], theirs[name]) < floor:
            return (f" (first below the floor: {name!r}, output of {node.op_type} node {node.name!r}, cosine "
                    f"{cosine(ours[name], theirs[name]):.4f})")
    return ""


def _fails(exc: Exception) -> QtcError:
    return QtcError(f"the compiled model fails on an input its source runs on: {' '.join(str(exc).split())[:400]}")


def _reference_outputs(source, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The source's outputs by onnx.reference.ReferenceEvaluator (numpy, every opset), for sources of at most
    REFERENCE_MAX_BYTES of weights; None where it cannot run them either."""
    model = _as_model(source)
    if tensor_bytes(model) > REFERENCE_MAX_BYTES:
        return None
    try:
        evaluator = ReferenceEvaluator(ir.to_proto(model))
        names = [v.name for v in model.graph.outputs]
        return dict(zip(names, evaluator.run(None, feed)))
    except Exception:  # noqa: BLE001 - the reference lacks the operator or rejects the feed: nothing to judge by
        return None


def _compare_with(expected: dict[str, np.ndarray], backend: Backend, compiled: ir.Model, feed) -> dict:
    try:
        produced = dict(zip(expected, backend.session(compiled).run(list(expected), feed)))
    except Exception as exc:  # noqa: BLE001 - the compiled model does not run where its source does
        raise _fails(exc) from None
    results = {}
    for name, value in expected.items():
        stats = OutputStats()
        stats.update(np.asarray(value), produced[name], logits="logit" in name)
        results[name] = stats.result()
    return results


def _as_model(source) -> ir.Model:
    """The source as the check received it: a model, serialized bytes, or a path."""
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, bytes):
        return ir.from_proto(onnx.ModelProto.FromString(source))
    return load_model(source)


def _loads(backend: Backend, compiled: ir.Model, also_source: str | None = None) -> None:
    try:
        backend.session(compiled)
    except Exception as exc:  # noqa: BLE001 - ORT's load errors
        error = " ".join(str(exc).split())
        if also_source is not None and error.split(":")[-1] == also_source.split(":")[-1]:
            raise QtcError(f"ONNX Runtime on this machine cannot load this model, nor its source: {error[:400]}") from None
        raise QtcError(f"the compiled model does not load in ONNX Runtime: {error[:400]}") from None


if __name__ == "__main__":
    run_in_child(*sys.argv[1:5])
