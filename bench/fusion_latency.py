"""ORT CPU latency of a float model (batch 1, 256 tokens): unfused export vs qtc-fused vs ORT's transformers optimizer.

Every variant runs with ORT's default session optimizations on (ORT_ENABLE_ALL), so the question is what qtc's
fusions add on top of what ORT already fuses at session creation. Runs are interleaved round-robin across
variants so that load from other processes on the machine spreads evenly over them.

    python -m qtc.bench.fusion_latency [MODEL.onnx] [--runs 10] [--tokens 256]

Default MODEL: the cached gemma-3-270m export. Results: bench/results/fusion_latency.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qtc.bench._util import machine, table, write_results
from qtc.cache import cache_dir
from qtc.calibration.data import load_calibration, model_inputs
from qtc.frontends.onnx_file import load_model
from qtc.passes.canonicalize import canonicalize_passes
from qtc.passes.fusion import FuseOperatorsPass, fusion_counts

# onnxruntime.transformers.optimizer has no Gemma type; gpt2 runs its generic decoder fusions (on tiny-llama,
# gpt2 / qwen3 / bert produced the same graph). Others: --ort-types.
ORT_MODEL_TYPES = ("gpt2",)


def default_model() -> Path:
    found = sorted(cache_dir("models").glob("gemma-3-270m-*/model.onnx"))
    if not found:
        raise SystemExit("no cached gemma-3-270m export: run `qtc export gemma-3-270m` first")
    return found[-1]


def qtc_variants(source: Path, folder: Path, canonical: bool) -> dict[str, tuple[Path, dict]]:
    """The cpu target's fusions on the canonicalized float graph (and that graph without them, if asked)."""
    out = {}
    for name, fuse in (("qtc canonical (no fusion)", False),) * canonical + (("qtc fused (cpu)", True),):
        model = load_model(source)
        ir.passes.PassManager(canonicalize_passes(21))(model)
        if fuse:
            FuseOperatorsPass("cpu")(model)
        path = folder / f"{'fused' if fuse else 'canonical'}.onnx"
        ir.save(model, path, external_data=path.name + ".data")
        counts = {k: v["in_graph"] for k, v in fusion_counts(model).get("fusions", {}).items() if v["applied"]}
        out[name] = (path, counts)
        del model  # a 1 GB model must not stay alive beside the sessions
    return out


def ort_optimizer_variants(source: Path, folder: Path, model_types: list[str]) -> dict[str, tuple[Path, dict]]:
    from onnxruntime.transformers.optimizer import optimize_model

    out = {}
    for model_type in model_types:
        try:
            optimized = optimize_model(str(source), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
        except Exception as exc:  # the optimizer rejects graphs it has no fusions for in many ways
            out[f"ort optimizer ({model_type})"] = (None, {"error": " ".join(str(exc).split())[:200]})
            continue
        path = folder / f"ort-{model_type}.onnx"
        optimized.save_model_to_file(str(path), use_external_data_format=True)
        out[f"ort optimizer ({model_type})"] = (path, dict(sorted(optimized.get_fused_operator_statistics().items())))
        del optimized
    return out


def runtime_ops(path: Path, folder: Path) -> dict[str, int]:
    """Ops after ORT's own session-time fusions: what really runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(folder / (path.stem + ".runtime.onnx"))
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", path.stem + ".rt.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return dict(sorted(Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.node).items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ort-types", default=",".join(ORT_MODEL_TYPES), help="optimizer model types to try")
    parser.add_argument("--canonical", action="store_true", help="also time qtc's canonical graph without fusion")
    args = parser.parse_args(argv)
    source = args.model or default_model()
    calib = load_calibration("zh-news", tokenizer=source.parent / "tokenizer.json", n_samples=1, seq_len=args.tokens, seed=0)
    feed = next(calib.feeds(model_inputs(load_model(source)), heldout=True))
    with tempfile.TemporaryDirectory(prefix="qtc-fusion-bench-") as tmp:
        folder = Path(tmp)
        variants = {"export (unfused)": (source, {})} | qtc_variants(source, folder, args.canonical) \
            | ort_optimizer_variants(source, folder, [t for t in args.ort_types.split(",") if t])
        sessions, info = {}, {}
        for name, (path, fused) in variants.items():
            info[name] = {"fused": fused}
            if path is None:
                continue
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = args.threads
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            info[name]["runtime_ops"] = runtime_ops(path, folder)
        reference = None
        for name, session in sessions.items():  # warm-up, and every variant must compute the same logits
            logits = session.run(None, feed)[0]
            reference = logits if reference is None else reference
            info[name]["max_abs_diff_vs_export"] = float(np.abs(logits - reference).max())
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(args.runs):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append(time.perf_counter() - start)
    rows = []
    for name, entry in info.items():
        if name in times:
            entry["median_ms"] = 1000 * statistics.median(times[name])
            entry["min_ms"] = 1000 * min(times[name])
            entry["runs_ms"] = [round(1000 * t, 2) for t in times[name]]
        rows.append([name, f"{entry.get('median_ms', float('nan')):.1f}", f"{entry.get('min_ms', float('nan')):.1f}",
                     f"{entry.get('max_abs_diff_vs_export', float('nan')):.2e}",
                     ", ".join(f"{k} {v}" for k, v in entry["fused"].items() if v) or "-"])
    print(table(["variant", "median ms", "min ms", "max |diff|", "fused"], rows))
    write_results("fusion_latency", {"model": str(source), "tokens": args.tokens, "batch": 1, "runs": args.runs,
                                     "threads": args.threads, "ort": ort.__version__, "machine": machine(),
                                     "variants": info})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
