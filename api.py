"""The Python API: `qtc.compile(...)`. The CLI calls exactly this."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from qtc.backends import compile_target
from qtc.backends.base import ACCURACY_LEVEL, SESSION_PREFIX, runtime_numerics, sharing_sessions, without_spinning
from qtc.backends.compare import compare_models
from qtc.calibration.data import (
    CalibrationSet,
    check_vocabulary,
    load_calibration,
    model_inputs,
    tokenizer_beside,
)
from qtc.errors import QtcError
from qtc.frontends.decoder import servable_folder_files
from qtc.frontends.onnx_file import (
    data_file_name,
    external_tensors,
    file_bytes,
    load_model,
    save_model,
    tensor_bytes,
)
from qtc.measure.card import quantization_card
from qtc.measure.check import check_compiled, check_large, random_feed
from qtc.measure.inspection import graph_summary
from qtc.measure.mixed_precision import (
    METRICS,
    fallback_sizes,
    measured_drop,
    with_fallback,
)
from qtc.measure.parity import tolerance_class
from qtc.measure.sensitivity import layer_sensitivity
from qtc.passes import meta
from qtc.passes.calibrate import CalibrationCache
from qtc.passes.layerskip import LayerSkipSpec
from qtc.passes.pipeline import build_analysis_pipeline, build_pipeline, sequential_gptq, weight_specs
from qtc.recipes import Recipe, load_recipe
from qtc.util.cache import sha256_file
from qtc.util.files import write_json_atomic, write_text_atomic
from qtc.util.spill import PeakTracker, SpillStore, available_memory, peak_rss, spilling
from qtc.util.version import __version__

DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 256


@dataclass
class CompileResult:
    """A compiled model in memory and its report (plain, JSON-serializable data)."""

    model: ir.Model
    report: dict
    source: Path | None = None
    external_data: bool | None = None
    written: list[Path] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model (external data beside it when large) and the sidecar `OUT.qtc.json`, atomically."""
        path = Path(path)
        _refuse_overwriting_source(path, self.source, self.model)
        companions = servable_folder_files(self.source, path, self.model.graph) if self.source is not None else {}
        self.written = save_model(self.model, path, external_data=self.external_data)
        self.report["output"] = {
            "path": path.name,
            "files": {p.name: p.stat().st_size for p in self.written},
            "bytes": sum(p.stat().st_size for p in self.written),
        }
        source_bytes = self.report["size"]["source_file_bytes"]
        if source_bytes:
            self.report["output"]["ratio_to_source"] = self.report["output"]["bytes"] / source_bytes
        write_json_atomic(sidecar_path(path), self.report)
        write_text_atomic(card_path(path), quantization_card(self.report))
        self.written.append(card_path(path))
        self.written += _write_companions(companions, path.parent)
        return path


def _write_companions(files: dict, folder: Path) -> list[Path]:
    """The source's tokenizer files (never replacing one already there) and, for a decoder, its genai_config.json
    naming the output: the folder runs in onnxruntime-genai as the source's did."""
    written = []
    for name, content in files.items():
        target = folder / name
        if isinstance(content, dict):
            write_json_atomic(target, content)
        else:
            shutil.copyfile(content, target)
        written.append(target)
    return written


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".qtc.json")


def card_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".card.md")


def _refuse_overwriting_source(out: Path, source: Path | None, model: ir.Model) -> None:
    if source is None:
        return
    if out.resolve() == source.resolve():
        raise QtcError(f"output path is the input model itself: {out} (choose another -o)")
    inputs = {(source.parent / t.location).resolve() for t in external_tensors(model) if source}
    if (out.parent / data_file_name(out)).resolve() in inputs | {source.resolve()}:
        raise QtcError(f"output {out} would overwrite the input's external data (choose another -o)")


def _source_file_bytes(path: Path | None, model: ir.Model) -> int:
    return file_bytes(path, model) if path is not None else 0


def _provenance(job: "_Job") -> dict[str, str]:
    """metadata_props written into the model: strings, sorted keys, nothing time-dependent."""
    recipe, target, calib, source = job.recipe, job.backend.name, job.calib, job.source
    props = {
        "qtc.version": __version__,
        "qtc.recipe": recipe.to_json(),
        "qtc.recipe.requested": job.requested.to_json(),  # before the target adapted it: what `qtc verify` rebuilds
        "qtc.target": target,
        "qtc.calibration.calibrator": recipe.activation.calibrator if recipe.activation else "none",
    }
    props |= {f"{SESSION_PREFIX}{key}": value for key, value in job.session_entries.items()}
    if job.target_notes:
        props["qtc.target.notes"] = json.dumps(job.target_notes, ensure_ascii=False)
    if source is not None:
        props["qtc.source.file"] = source.name
        props["qtc.source.sha256"] = sha256_file(source)
    if calib is not None:
        for key, value in calib.provenance().items():
            props[f"qtc.calibration.{key}"] = "" if value is None else str(value)
    return props


def compile(  # noqa: A001 - the public name users expect: qtc.compile
    model: str | os.PathLike | ir.Model,
    recipe: str | os.PathLike | Recipe = "w8a8",
    calib: str | os.PathLike | CalibrationSet | None = None,
    target: str = "cpu",
    *,
    tokenizer: str | os.PathLike | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    calibrator: str | None = None,
    seed: int = 0,
    compare: bool = True,
    quiet: bool = False,
    allow_fallback: bool = False,
    layer_skip: "LayerSkipSpec | None" = None,
    fuse_residuals: bool | None = None,
    calibration_cache: CalibrationCache | None = None,
    memory_limit: int | None = None,
) -> CompileResult:
    """Compile a float ONNX model with a recipe for a target. A path is loaded fresh; an ir.Model is changed in place.

    A target that splits graphs (cann) refuses to produce nodes it cannot take unless `allow_fallback`.
    `memory_limit` (bytes; default: the memory available now) decides how a large model is compiled: weights
    over a third of it are spilled to a scratch file as they are quantized (util/spill.py), calibration runs the
    graph a slice at a time when a whole-graph session would not fit (passes/segments.py), and a float source
    over half of it is not run beside the compiled model (the report says what was checked instead)."""
    started = time.perf_counter()
    job = _prepare(model, recipe, calib, target, tokenizer, samples, seq_len, calibrator, seed)
    source, graph_model, resolved, calib_set, backend = job.source, job.model, job.recipe, job.calib, job.backend
    before = graph_summary(graph_model)
    source_bytes = _source_file_bytes(source, graph_model)
    source_external = bool(external_tensors(graph_model))
    reference = source if source is not None else ir.to_proto(graph_model).SerializeToString()
    inputs = model_inputs(graph_model)
    derived = random_feed(graph_model)  # from the source's inputs, before the graph changes
    if layer_skip is not None and calib_set is None:
        raise QtcError("--layer-skip scores branches on calibration text: pass --calib")
    # Layer skipping gates residual Adds, so it keeps them unfused; `fuse_residuals=False` builds its ungated twin.
    keep_residual_adds = layer_skip is not None if fuse_residuals is None else not fuse_residuals
    level = job.session_entries.get(ACCURACY_LEVEL)
    limit = memory_limit or available_memory()
    store = SpillStore() if before["tensor_bytes"] > limit / 3 else None
    segment_bytes = calibration_segment_bytes(before["tensor_bytes"], limit)
    if sequential_gptq(resolved):  # about a layer per segment: each layer's statistics see the layers before quantized
        segment_bytes = min(segment_bytes or before["tensor_bytes"], layer_bytes(graph_model))
    measure = job.measure
    # Sessions take about twice their weights: where both models' fit in half the limit, each loads once for
    # the check, the held-out comparison and the source runs in between, and the source's is opened on a thread
    # once the passes that run the model are done (gemma-3-270m's 2.6 s then overlap the one-threaded weight and
    # graph passes after them: GPTQ's rows, QDQ insertion, fusions)
    fits = 4 * before["tensor_bytes"] <= limit / 2
    peaks = PeakTracker()
    opened: list = []  # the source's session being opened ahead, once the passes that run the model are done
    with spilling(store), without_spinning():
        try:
            _run(build_pipeline(resolved, target, calib_set, _provenance(job), quiet, allow_fallback, layer_skip,
                                keep_residual_adds, calibration_cache, int(level) if level is not None else None,
                                segment_bytes), graph_model, peaks,
                 (lambda: opened.append(measure.open_ahead(reference))) if fits else None)
        except BaseException:
            for future in opened:
                future.exception()  # no thread outlives a failed compile
            raise
    # Before anything is handed back: the compiled model must run where its source runs, and agree with it.
    checks = PeakTracker()  # what the checks after the passes hold and take, reported beside the passes'
    large = before["tensor_bytes"] > limit / 2  # the float source would not fit beside the compiled model
    compare = compare and not large
    heldout = None
    with sharing_sessions() if fits else contextlib.nullcontext(), without_spinning():
        for future in opened:
            measure.adopt_session(reference, future)
        if compare:  # first: the session that reads ORT's optimized graph is then the one the checks share
            runtime = checks.step("runtime_ops", lambda: _runtime_ops(measure, graph_model, job.session_entries))
        if large:
            check = checks.step("post_compile_check", lambda: check_large(measure, graph_model, derived,
                                                                            before["tensor_bytes"], limit))
        else:
            check = checks.step("post_compile_check", lambda: check_compiled(
                measure, reference, graph_model, derived, tolerance_class({"qtc.recipe": resolved.to_json()})))
        if compare and calib_set is not None and calib_set.heldout_samples:
            if check.get("source_run_by") != "onnxruntime":
                # ONNX Runtime cannot run the source (an operator of an old opset it no longer implements): the
                # comparison would fail opening it, and the check above already judged the output another way
                heldout = {"skipped": "ONNX Runtime does not run the source here (see post_compile_check): "
                                      "no held-out comparison"}
            else:
                heldout = checks.step("heldout_comparison", lambda: compare_models(
                    measure, reference, graph_model, calib_set.feeds(inputs, heldout=True)))
    report = {
        "qtc_version": __version__,
        "recipe": resolved.to_dict(),
        "target": target,
        "calibration": _calibration_report(calib_set, resolved),
        "calibrated_on": measure.name,
        "source": {"file": source.name if source else None, "graph": before},
        "compiled": {"graph": graph_summary(graph_model), **meta.quantized_counts(graph_model),
                     "expanded_int8_weights": graph_model.meta.get(meta.EXPANDED, 0)},
        "size": {"source_file_bytes": source_bytes, "source_tensor_bytes": before["tensor_bytes"],
                 "compiled_tensor_bytes": tensor_bytes(graph_model)},
        **meta.report_sections(graph_model),
        "placement": backend.placement(graph_model),
        "post_compile_check": check,
        "target_notes": job.target_notes,
    }
    if heldout is not None:
        report["heldout_comparison"] = heldout | {"provider": measure.provider}
    if compare:
        report["runtime_ops"] = runtime
    report["compile_seconds"] = round(time.perf_counter() - started, 3)
    report["seconds"] = {"passes": _largest_first(_sum_steps(peaks.seconds), digits=2),
                         "checks": _largest_first(_sum_steps(checks.seconds), digits=2)}
    report["memory"] = {"limit_bytes": limit, "spilled": store.summary() if store else None,
                        # this process's, since it started; and per pass and per check (the largest first)
                        "process_peak_rss_bytes": max(peaks.overall, checks.overall, peak_rss() or 0),
                        "pass_peak_rss_bytes": _largest_first(_merge_steps(peaks.steps)),
                        "check_peak_rss_bytes": _largest_first(_merge_steps(checks.steps))}
    # A model that came with external data leaves with it (and saving stays streaming, not one huge protobuf).
    result = CompileResult(graph_model, report, source, external_data=source_external or None)
    if store is not None:  # the scratch file lives as long as the model that reads it
        weakref.finalize(result, store.close)
    return result


def _merge_steps(steps: list[tuple[str, int]]) -> dict[str, int]:
    """A pass that runs twice (RemoveUnusedNodesPass) is reported once, with its larger peak."""
    merged: dict[str, int] = {}
    for name, peak in steps:
        merged[name] = max(merged.get(name, 0), peak)
    return merged


def _sum_steps(steps: list[tuple[str, float]]) -> dict[str, float]:
    """A pass that runs twice is reported once, with its total time."""
    summed: dict[str, float] = {}
    for name, seconds in steps:
        summed[name] = summed.get(name, 0.0) + seconds
    return summed


def _largest_first(values: dict, digits: int | None = None) -> dict:
    return {name: round(value, digits) if digits is not None else value
            for name, value in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))}


def layer_bytes(model: ir.Model) -> int:
    """About one layer's weights: all but the largest tensor (an embedding table) shared over the layers (a
    decoder's, from its KV-cache inputs; 16 for other graphs)."""
    sizes = sorted(int(v.const_value.nbytes) for v in model.graph.initializers.values() if v.const_value is not None)
    caches = sum(spec.present is not None for spec in model_inputs(model))  # a key and a value per layer
    return max(1 << 20, sum(sizes[:-1]) // (max(1, caches // 2) if caches else 16))


def calibration_segment_bytes(tensor_bytes: int, limit: int) -> int | None:
    """How calibration runs the float graph: whole (None) when ONNX Runtime's copy of the weights, about twice
    their bytes with pre-packing (qwen2.5-coder-0.5b: 2.5 GB of weights, 5.2 GB peak), fits in a third of the
    limit beside the model qtc holds; else a slice of at most a tenth of the limit at a time."""
    return None if 2 * tensor_bytes <= limit / 3 else max(int(limit / 10), 1 << 20)


@dataclass
class _Job:
    source: Path | None
    model: ir.Model
    recipe: Recipe
    calib: CalibrationSet | None
    backend: object
    measure: object  # where calibration and comparisons run (the target, or ORT CPU when cross-compiling)
    target_notes: list[str]
    session_entries: dict[str, str]
    requested: Recipe  # the recipe as asked for (with --calibrator), before the target adapted it


def _prepare(model, recipe, calib, target, tokenizer, samples, seq_len, calibrator, seed) -> _Job:
    """Load and validate everything a compile or an analysis needs, before any work starts."""
    source = Path(model) if not isinstance(model, ir.Model) else None
    graph_model = load_model(source) if source is not None else model
    backend = compile_target(target)
    requested = load_recipe(recipe).with_calibrator(calibrator)
    resolved, target_notes, session_entries = backend.adapt_recipe(requested)
    measure = backend.measuring_backend()
    if measure is not backend and backend.provider not in ort.get_available_providers():
        target_notes = [*target_notes, f"cross-compiled: this machine's onnxruntime {ort.__version__} has no "
                        f"{backend.provider}, so calibration and the float comparison ran on {measure.provider} (the "
                        f"same float graph); the file is the {target} form, and what {target} computes is in these notes"]
    calib_set = _calibration(calib, source, tokenizer, samples, seq_len, seed)
    if calib_set is not None and calib_set.kind == "text":
        check_vocabulary(graph_model, calib_set.vocab_size, calib_set.tokenizer)
    if resolved.needs_calibration and calib_set is None:
        # No silent random calibration: static ranges, smoothing and GPTQ/AWQ need real data.
        raise QtcError(f"recipe {resolved.name!r} needs calibration data: pass --calib")
    return _Job(source, graph_model, resolved, calib_set, backend, measure, target_notes, session_entries, requested)


def _run(pipeline: ir.passes.PassManager, model: ir.Model, peaks: PeakTracker | None = None,
         after_model_runs: Callable[[], None] | None = None) -> None:
    """Run the pipeline (pass by pass under `peaks`, which records each pass's peak RSS). `after_model_runs` is
    called once the last pass that runs the model in ONNX Runtime is done (before the first pass where none does):
    what follows is mostly one-threaded graph and weight work, beside which a session can be opened."""
    try:
        if peaks is None:
            pipeline(model)
            return
        runs = [i for i, step in enumerate(pipeline.passes) if getattr(step, "runs_model", False)]
        for i, step in enumerate(pipeline.passes):
            if after_model_runs is not None and i == (runs[-1] + 1 if runs else 0):
                after_model_runs()
            peaks.step(type(step).__name__, lambda step=step: step(model))
    except ir.passes.PassError as exc:
        # The pass manager wraps what a pass raises; a user error inside a pass is still a user error.
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, QtcError):  # managers nest managers; contracts wrap too
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def analyze(
    model: str | os.PathLike | ir.Model,
    recipe: str | os.PathLike | Recipe = "w8a8",
    calib: str | os.PathLike | CalibrationSet | None = None,
    target: str = "cpu",
    *,
    tokenizer: str | os.PathLike | None = None,
    samples: int = 16,
    seq_len: int = DEFAULT_SEQ_LEN,
    calibrator: str | None = None,
    seed: int = 0,
    quiet: bool = False,
    cache: CalibrationCache | None = None,
) -> dict:
    """Per-layer sensitivity of MODEL under RECIPE (lowest SQNR first), from one streamed calibration run
    (`cache`: keeps what it streamed for compiles of the same model on the same windows)."""
    job = _prepare(model, recipe, calib, target, tokenizer, samples, seq_len, calibrator, seed)
    if job.calib is None:
        raise QtcError("analysis measures layers on real data: pass --calib")
    _run(build_analysis_pipeline(job.recipe, target, job.calib, quiet, cache), job.model)
    layers = layer_sensitivity(job.model)
    return {
        "qtc_version": __version__,
        "recipe": job.recipe.to_dict(),
        "calibration": _calibration_report(job.calib, job.recipe),
        "layers": layers,
        "dominant_noise": {kind: sum(1 for r in layers if r["dominant_noise"] == kind) for kind in ("weight", "activation")},
    }


def compile_within(
    model: str | os.PathLike,
    budget: tuple[str, float],
    recipe: str | os.PathLike | Recipe = "w8a8",
    calib: str | os.PathLike | CalibrationSet | None = None,
    target: str = "cpu",
    **options,
) -> CompileResult:
    """Compile, falling back the most sensitive layers to higher precision until the held-out metric drop is
    within `budget` (see qtc.measure.mixed_precision). The report's `fallback` section lists each attempt and the layers kept."""
    metric, limit = budget
    base = load_recipe(recipe).with_calibrator(options.get("calibrator"))
    # Every attempt and the analysis read the same windows; the cache lets each stream only what is new (the
    # analysis streams every layer's statistics and ranges, so even the first attempt reuses them).
    calib = _calibration(calib, Path(model), options.get("tokenizer"), options.get("samples", DEFAULT_SAMPLES),
                         options.get("seq_len", DEFAULT_SEQ_LEN), options.get("seed", 0))
    cache, attempts = CalibrationCache(), []
    analysis_options = {k: options[k] for k in ("tokenizer", "samples", "seq_len", "seed") if k in options}
    ranking = analyze(model, base, calib, target, quiet=options.get("quiet", False), cache=cache,
                      **analysis_options)["layers"]

    def attempt(k: int, reuse: bool) -> CompileResult:
        started = time.perf_counter()
        result = compile(model, with_fallback(base, [r["node"] for r in ranking[:k]]), calib, target,
                         calibration_cache=cache if reuse else None, **options)
        attempts.append({"kept_layers": k, "drop": measured_drop(result.report, metric),
                         "calibration": "reused" if reuse else "streamed",
                         "seconds": round(time.perf_counter() - started, 1)})
        return result

    # Nothing kept; then everything (when even that misses the budget, no subset meets it: stop); then the
    # smallest of 1, 2, 4, ... that meets it.
    k, result = 0, attempt(0, reuse=True)
    if attempts[-1]["drop"] > limit and ranking:
        # the missed attempt is not returned: let it go before the next one (--max-drop's peak held both models)
        result = None
        k, result = len(ranking), attempt(len(ranking), reuse=True)
        if attempts[-1]["drop"] <= limit:
            for size in fallback_sizes(len(ranking))[1:-1]:
                smaller = attempt(size, reuse=True)
                if attempts[-1]["drop"] <= limit:
                    k, result = size, smaller
                    break
                smaller = None
    if len(attempts) > 1 and _reuse_is_approximate(base):
        # Reused ranges were measured on a graph smoothed (or AWQ-scaled) for another fallback set: equal up to
        # float rounding. The result is then a fresh compile of the chosen recipe, so recompiling the report's
        # recipe gives these bytes; without smoothing the reused statistics are the ones a fresh compile streams.
        result = None  # (replaced: not held beside its recompile)
        result = attempt(k, reuse=False)
    attempts_drop = next(a["drop"] for a in reversed(attempts) if a["kept_layers"] == k)
    kept, drop = ranking[:k], attempts_drop
    result.report["fallback"] = {
        "metric": metric, "meaning": METRICS[metric][0], "budget": limit, "met": drop <= limit, "attempts": attempts,
        "kept": [{"node": r["node"], "module": r["module"], "sqnr_db": r["sqnr_db"], "dominant_noise": r["dominant_noise"]}
                 for r in kept],
    }
    return result


def _reuse_is_approximate(recipe: Recipe) -> bool:
    """Whether a fallback set changes the float activations the cache holds ranges of (smoothing and AWQ rescale
    activations layer by layer, so which layers are kept changes what the others read)."""
    return recipe.smooth is not None or any(spec.algorithm == "awq" for spec in weight_specs(recipe))


def _runtime_ops(measure, model: ir.Model, session_entries: dict[str, str]) -> dict:
    """What ORT really runs after its own optimizations; a model ORT cannot optimize here (its source could not run
    on a derived feed either: a string op without its locale, say) reports why instead of failing the compile."""
    try:
        ops = measure.runtime_ops(model)
    except Exception as exc:  # noqa: BLE001 - ORT's load errors
        return {"provider": measure.provider, "error": " ".join(str(exc).split())[:300]}
    return {"provider": measure.provider, "ops": ops, "numerics": runtime_numerics(ops, session_entries),
            "session_config": session_entries}


def _calibration(calib, source, tokenizer, samples, seq_len, seed) -> CalibrationSet | None:
    if calib is None or isinstance(calib, CalibrationSet):
        return calib
    if samples < 1 or seq_len < 2:
        raise QtcError("--samples must be >= 1 and --seq-len >= 2")
    tokenizer = tokenizer or tokenizer_beside(source)
    return load_calibration(calib, tokenizer=Path(tokenizer) if tokenizer else None, n_samples=samples,
                            seq_len=seq_len, seed=seed)


def _calibration_report(calib: CalibrationSet | None, recipe: Recipe) -> dict | None:
    if calib is None:
        return None
    return calib.provenance() | {"calibrator": recipe.activation.calibrator if recipe.activation else None}
