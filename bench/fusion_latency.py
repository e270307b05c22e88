"""ORT CPU latency of a float model (batch 1, 256 tokens): unfused export vs qtc-fused vs ORT's transformers optimizer.

Every variant runs with ORT's default session optimizations on (ORT_ENABLE_ALL), so the question is what qtc's
fusions add on top of what ORT already fuses at session creation. Runs are interleaved round-robin across
variants so that load from other processes on the machine spreads evenly over them.

    python -m qtc.bench.fusion_latency [MODEL.onnx] [--runs 20] [--tokens 256]

Fusions change a few percent of a prefill whose time is mostly MatMul (gemma-3-270m: 93 %, 57 % in the tied LM
head alone), which is the size of run-to-run noise on a shared machine. So besides medians, each variant gets its
per-round time ratio to the unfused export (paired: the same round, back to back), with a bootstrap 95 % interval
of the median ratio, and `--profile` adds ORT's per-op kernel times, where the fused ops' own cost shows.

Default MODEL: the cached gemma-3-270m export. Results: bench/results/fusion_latency.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from _util import machine, table, write_results

from qtc.calibration.data import load_calibration, model_inputs
from qtc.frontends.onnx_file import load_model
from qtc.passes.canonicalize import canonicalize_passes
from qtc.passes.fusion import FuseOperatorsPass, fusion_counts
from qtc.util.cache import cache_dir

# onnxruntime.transformers.optimizer has no Gemma type; gpt2 runs its generic decoder fusions (on tiny-llama,
# gpt2 / qwen3 / bert produced the same graph). Others: --ort-types.
ORT_MODEL_TYPES = ("gpt2",)


def default_model() -> Path:
    found = sorted(cache_dir("models").glob("gemma-3-270m-*/model.onnx"))
    if not found:
        raise SystemExit("no cached gemma-3-270m export: run `qtc export gemma-3-270m` first")
    return found[-1]


def qtc_variants(source: Path, folder: Path, canonical: bool) -> dict[str, tuple[Path, dict]]:
    """The cpu target's fusions on the canonicalized float graph at opset 21 (the default) and 23 (standard
    RotaryEmbedding / Attention), and that graph without them, if asked."""
    out = {}
    plan = (("qtc canonical (no fusion)", False, 21),) * canonical + (("qtc fused (cpu)", True, 21),
                                                                      ("qtc fused (cpu, opset 23)", True, 23))
    for name, fuse, opset in plan:
        model = load_model(source)
        ir.passes.PassManager(canonicalize_passes(opset))(model)
        if fuse:
            FuseOperatorsPass("cpu")(model)
        path = folder / f"{'fused' if fuse else 'canonical'}-{opset}.onnx"
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


def paired_ratio(times: list[float], reference: list[float], seed: int = 0) -> dict:
    """Median of per-round time ratios against the reference, with a bootstrap 95 % interval."""
    ratios = [t / r for t, r in zip(times, reference)]
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return {"median": statistics.median(ratios), "ci95": [boot[49], boot[1949]]}


def kernel_profile(path: Path, feed: dict, threads: int, runs: int = 3) -> dict[str, float]:
    """ORT's per-op-type kernel time (ms per run, sequential executor)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="qtc-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
    return {op: round(us / runs / 1000, 2) for op, us in by_op.most_common()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ort-types", default=",".join(ORT_MODEL_TYPES), help="optimizer model types to try")
    parser.add_argument("--canonical", action="store_true", help="also time qtc's canonical graph without fusion")
    parser.add_argument("--profile", action="store_true", help="add ORT's per-op kernel times per variant")
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
            if args.profile:
                info[name]["kernel_ms"] = kernel_profile(path, feed, args.threads)
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
    reference = times.get("export (unfused)")
    for name, entry in info.items():
        ratio = "-"
        if name in times:
            entry["median_ms"] = 1000 * statistics.median(times[name])
            entry["min_ms"] = 1000 * min(times[name])
            entry["runs_ms"] = [round(1000 * t, 2) for t in times[name]]
            entry["ratio_vs_export"] = paired_ratio(times[name], reference)
            r = entry["ratio_vs_export"]
            ratio = f"{r['median']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        rows.append([name, f"{entry.get('median_ms', float('nan')):.1f}", f"{entry.get('min_ms', float('nan')):.1f}",
                     ratio, f"{entry.get('max_abs_diff_vs_export', float('nan')):.2e}",
                     ", ".join(f"{k} {v}" for k, v in entry["fused"].items() if v) or "-"])
    print(table(["variant", "median ms", "min ms", "x export (paired, 95% CI)", "max |diff|", "fused"], rows))
    write_results("fusion_latency", {"model": str(source), "tokens": args.tokens, "batch": 1, "runs": args.runs,
                                     "threads": args.threads, "ort": ort.__version__, "machine": machine(),
                                     "variants": info})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
