"""Peak memory of qtc on a model with more than 2 GB of weights (external data), and the result's accuracy.

Steps, each in its own fresh process (peak RSS = VmHWM of that process, plus a sampled RSS timeline by phase):
1. build:   a chain of --layers x (MatMul [--hidden x --hidden] fp32 + Relu), input x [1, hidden], output y;
            seeded He-scaled random weights, generated one at a time (onnx_ir LazyTensor) while
            `qtc.frontends.onnx_file.save_model(..., external_data=True)` writes them, so the build never holds
            the whole model in memory. The final op is a Relu, so qtc's LM-head rule does not keep the last
            MatMul in float: every weight is quantized.
2. compile: `qtc.compile(path, recipe="w8a16", calib=None, compare=False)` + `.save(out)`; the target is a
            peak RSS below 1.5 x the weight bytes. Per-pass peaks come from wrapping onnx_ir's pass __call__.
3. float / quantized: one ORT CPU session each, one inference on the same seeded input; outputs compared
            (cosine, max |diff|).
The multi-GB files live in a temporary folder under /tmp, removed at the end unless --keep.

    python bench/big_model_memory.py [--layers 9] [--hidden 8192] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (  # noqa: E402
    RssSampler,
    current_rss_bytes,
    machine,
    mib,
    peak_rss_bytes,
    run_worker,
    table,
    write_results,
    write_worker_result,
)

NAME = "big_model_memory"
TARGET_RATIO = 1.5
GiB = 1 << 30


# --------------------------------------------------------------------------------------------- workers


def _weight(index: int, hidden: int, seed: int):
    import numpy as np

    rng = np.random.default_rng([seed, index])
    w = rng.standard_normal((hidden, hidden), dtype=np.float32)
    w *= np.float32(np.sqrt(2.0 / hidden))  # He scaling: activations keep their size through the Relu chain
    return w


def _input(hidden: int, seed: int):
    import numpy as np

    return np.random.default_rng([seed, 10_000]).standard_normal((1, hidden), dtype=np.float32)


def _build_worker(args) -> dict:
    import onnx_ir as ir

    from qtc.frontends.onnx_file import save_model

    rss_after_imports = peak_rss_bytes()
    started = time.perf_counter()
    hidden = args.hidden
    float_type = ir.TensorType(ir.DataType.FLOAT)
    x = ir.Value(name="x", type=float_type, shape=ir.Shape([1, hidden]))
    nodes, initializers, current = [], [], x
    for i in range(args.layers):
        def make(i=i):
            return ir.tensor(_weight(i, hidden, args.seed), name=f"w{i}")

        tensor = ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape([hidden, hidden]), name=f"w{i}")
        weight = ir.Value(name=f"w{i}", type=float_type, shape=ir.Shape([hidden, hidden]), const_value=tensor)
        initializers.append(weight)
        matmul = ir.node("MatMul", [current, weight], name=f"matmul_{i}", outputs=[ir.Value(name=f"h{i}")])
        last = i == args.layers - 1
        out = ir.Value(name="y" if last else f"a{i}", type=float_type if last else None,
                       shape=ir.Shape([1, hidden]) if last else None)
        relu = ir.node("Relu", [matmul.outputs[0]], name=f"relu_{i}", outputs=[out])
        nodes += [matmul, relu]
        current = out
    graph = ir.Graph([x], [current], nodes=nodes, initializers=initializers, opset_imports={"": 21},
                     name="big_mlp")
    model = ir.Model(graph, ir_version=10, producer_name="qtc-bench")
    written = save_model(model, args.out, external_data=True)
    seconds = time.perf_counter() - started
    import numpy as np

    np.save(args.input, _input(hidden, args.seed))
    return {
        "seconds": round(seconds, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_imports_bytes": rss_after_imports,
        "weight_bytes": args.layers * hidden * hidden * 4,
        "files": {p.name: p.stat().st_size for p in written},
    }


def _compile_worker(args) -> dict:
    import onnx_ir as ir
    from onnx_ir.passes import _pass_infra

    import qtc

    rss_after_imports = peak_rss_bytes()
    with RssSampler(interval=0.02) as sampler:
        # Label the RSS timeline with the pass that is running (no change to qtc: a wrapper around __call__).
        original_call = _pass_infra.PassBase.__call__

        def traced(self, model):
            if not isinstance(self, (ir.passes.PassManager, _pass_infra.Sequential)):
                sampler.mark(type(self).__name__)
            return original_call(self, model)

        _pass_infra.PassBase.__call__ = traced
        try:
            sampler.mark("compile:load+setup")
            started = time.perf_counter()
            result = qtc.compile(args.model, recipe="w8a16", calib=None, compare=False, quiet=True)
            compiled = time.perf_counter()
            sampler.mark("compile:report")
            peak_after_compile = peak_rss_bytes()
            rss_after_compile = current_rss_bytes()
            sampler.mark("save")
            if args.force_external:
                # Diagnostic: what CompileResult.save costs when the output is written with external data.
                from qtc.frontends.onnx_file import save_model

                written = save_model(result.model, args.out, external_data=True)
                result.report["output"] = {"files": {p.name: p.stat().st_size for p in written},
                                           "bytes": sum(p.stat().st_size for p in written), "forced_external": True}
            else:
                result.save(args.out)
            saved = time.perf_counter()
            sampler.mark("done")
        finally:
            _pass_infra.PassBase.__call__ = original_call
    return {
        "compile_seconds": round(compiled - started, 3),
        "save_seconds": round(saved - compiled, 3),
        "total_seconds": round(saved - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_after_compile_bytes": peak_after_compile,
        "rss_after_compile_bytes": rss_after_compile,
        "rss_after_imports_bytes": rss_after_imports,
        "peak_rss_by_phase_bytes": sampler.peaks,
        "phase_order": list(sampler.peaks),
        "output": result.report.get("output"),
        "report_size": result.report.get("size"),
        "quantized_nodes_by_op": result.report["compiled"]["quantized_nodes_by_op"],
        "kept_float_roles": result.report["compiled"]["kept_float_roles"],
        "warnings": result.report.get("warnings"),
    }


def _run_worker(args) -> dict:
    import numpy as np
    import onnxruntime as ort

    rss_after_imports = peak_rss_bytes()
    x = np.load(args.input)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = os.cpu_count() or 1
    with RssSampler(interval=0.02) as sampler:
        sampler.mark("session")
        started = time.perf_counter()
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
        loaded = time.perf_counter()
        rss_after_load = current_rss_bytes()
        sampler.mark("run")
        (y,) = session.run(None, {"x": x})
        ran = time.perf_counter()
        sampler.mark("second run")
        session.run(None, {"x": x})
        ran2 = time.perf_counter()
        sampler.mark("done")
    np.save(args.out, y)
    return {
        "session_seconds": round(loaded - started, 3),
        "run_seconds": round(ran - loaded, 3),
        "second_run_seconds": round(ran2 - ran, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_imports_bytes": rss_after_imports,
        "rss_after_session_bytes": rss_after_load,
        "peak_rss_by_phase_bytes": sampler.peaks,
    }


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=9, help="MatMul+Relu blocks (default 9)")
    parser.add_argument("--hidden", type=int, default=8192, help="square weight size (default 8192: 256 MiB each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder with the models")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), help="parent of the temporary folder")
    parser.add_argument("--worker", choices=["build", "compile", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--force-external", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-diagnostic", action="store_true",
                        help="skip the extra compile that saves with external_data=True")
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker = {"build": _build_worker, "compile": _compile_worker, "run": _run_worker}[args.worker]
        write_worker_result(args.result, worker(args))
        return 0

    import numpy as np

    weight_bytes = args.layers * args.hidden * args.hidden * 4
    folder = Path(tempfile.mkdtemp(prefix="qtc-big-", dir=args.tmp))
    script = Path(__file__).resolve()
    float_path, quant_path = folder / "float" / "model.onnx", folder / "w8a16" / "model.onnx"
    float_path.parent.mkdir()
    x_path = folder / "x.npy"
    results: dict = {
        "benchmark": NAME,
        "settings": {"layers": args.layers, "hidden": args.hidden, "seed": args.seed},
        "weight_bytes": weight_bytes,
        "target_peak_rss_bytes": int(TARGET_RATIO * weight_bytes),
        "machine": machine(),
        "steps": {},
    }
    size = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--seed", str(args.seed)]
    ok = True
    try:
        steps = [
            ("build", ["--worker", "build", *size, "--out", str(float_path), "--input", str(x_path)]),
            ("compile", ["--worker", "compile", "--model", str(float_path), "--out", str(quant_path)]),
            ("float", ["--worker", "run", "--model", str(float_path), "--out", str(folder / "y_float.npy"),
                       "--input", str(x_path)]),
            *([] if args.no_diagnostic else [
                ("compile-external", ["--worker", "compile", "--model", str(float_path), "--force-external",
                                      "--out", str(folder / "w8a16-external" / "model.onnx")])]),
            ("w8a16", ["--worker", "run", "--model", str(quant_path), "--out", str(folder / "y_w8a16.npy"),
                       "--input", str(x_path)]),
        ]
        for name, step_args in steps:
            print(f"[{NAME}] {name} ...", flush=True)
            data = run_worker(script, step_args, folder / f"{name}.json")
            results["steps"][name] = data
            if not data["ok"]:
                print(f"[{NAME}] {name} FAILED:\n{data['error']}", file=sys.stderr)
                ok = False
                break
        if ok:
            ref, out = np.load(folder / "y_float.npy").astype(np.float64), np.load(folder / "y_w8a16.npy")
            out = out.astype(np.float64)
            results["quality"] = {
                "cosine": float(ref.ravel() @ out.ravel() / (np.linalg.norm(ref) * np.linalg.norm(out))),
                "max_abs_diff": float(np.max(np.abs(ref - out))),
                "relative_l2_error": float(np.linalg.norm(ref - out) / np.linalg.norm(ref)),
                "float_output_rms": float(np.sqrt(np.mean(ref**2))),
            }
            compile_peak = results["steps"]["compile"]["peak_rss_bytes"]
            results["compile_peak_over_weight_bytes"] = compile_peak / weight_bytes
            results["target_met"] = compile_peak < TARGET_RATIO * weight_bytes
    finally:
        if args.keep:
            results["folder"] = str(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    path = write_results(NAME, results)
    print()
    print(render(results))
    print(f"\nwritten: {path}" + (f"\nmodels kept in: {folder}" if args.keep else ""))
    return 0 if ok else 1


def render(results: dict) -> str:
    s, w = results["settings"], results["weight_bytes"]
    lines = [f"{s['layers']} x MatMul [{s['hidden']} x {s['hidden']}] fp32 + Relu: {w / GiB:.2f} GiB of weights "
             f"({w / 1e9:.2f} GB); target compile peak RSS < {TARGET_RATIO} x = {mib(results['target_peak_rss_bytes'])} MiB"]
    rows = []
    for name, step in results["steps"].items():
        if not step.get("ok"):
            rows.append([name, "FAILED", "-", "-", "-"])
            continue
        seconds = step.get("total_seconds", step.get("seconds"))
        if seconds is None:
            seconds = step["session_seconds"] + step["run_seconds"]
        peak = step["peak_rss_bytes"]
        rows.append([name, f"{seconds:.1f}", mib(peak), mib(step["rss_after_imports_bytes"]), f"{peak / w:.2f}"])
    lines.append(table(["step", "wall s", "peak RSS MiB", "RSS after imports MiB", "peak / weight bytes"], rows))
    compile_step = results["steps"].get("compile", {})
    if compile_step.get("ok"):
        lines.append(f"compile {compile_step['compile_seconds']:.1f} s + save {compile_step['save_seconds']:.1f} s; "
                     f"output {mib(compile_step['output']['bytes'])} MiB; peak by phase (MiB): "
                     + ", ".join(f"{k} {mib(v)}" for k, v in compile_step["peak_rss_by_phase_bytes"].items()))
        lines.append(f"quantized: {compile_step['quantized_nodes_by_op']}, kept float: "
                     f"{compile_step['kept_float_roles'] or 'none'}")
    diag = results["steps"].get("compile-external", {})
    if diag.get("ok"):
        lines.append(f"diagnostic, same compile saved with save_model(external_data=True): peak RSS "
                     f"{mib(diag['peak_rss_bytes'])} MiB ({diag['peak_rss_bytes'] / w:.2f} x), save "
                     f"{diag['save_seconds']:.1f} s, files {diag['output']['files']}; "
                     f"CompileResult.save wrote {compile_step.get('output', {}).get('files')}")
    for name in ("float", "w8a16"):
        step = results["steps"].get(name, {})
        if step.get("ok"):
            lines.append(f"ORT {name}: session {step['session_seconds']:.1f} s (RSS after {mib(step['rss_after_session_bytes'])} MiB), "
                         f"run {step['run_seconds']:.2f} s (second run {step['second_run_seconds']:.2f} s), "
                         "peak by phase (MiB): "
                         + ", ".join(f"{k} {mib(v)}" for k, v in step["peak_rss_by_phase_bytes"].items()))
    if "quality" in results:
        q = results["quality"]
        lines.append(f"w8a16 vs float output: cosine {q['cosine']:.6f}, max |diff| {q['max_abs_diff']:.4g}, "
                     f"relative L2 error {q['relative_l2_error']:.4g}")
        lines.append(f"compile peak RSS / weight bytes = {results['compile_peak_over_weight_bytes']:.2f} "
                     f"-> target {'MET' if results['target_met'] else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
