"""Does merging a gated MLP's gate and up projections into one MatMul pay on ORT CPU?

SwiGLU / GeGLU MLPs compute act(x Wg) * (x Wu). ORT 1.32 has no fused gated-MLP op for dense models on CPU (its
SwiGLU lives inside the MoE ops; BiasSplitGelu is erf-GELU and CUDA/WebGPU only), so the one rewrite a compiler
could make is x [Wg | Wu] followed by a Split: one GEMM of twice the width instead of two. This times both forms
on a stack of Gemma-3-270m-sized MLPs (hidden 640, intermediate 2048, tanh GELU, residual Add), interleaved,
and prints the paired time ratio with a bootstrap interval. qtc keeps the two projections separate (they stay
individually quantizable and name-addressable by recipe globs) unless this shows a gain.

    python -m qtc.bench.gated_mlp [--layers 18] [--tokens 256] [--runs 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from _util import machine, write_results
from fusion_latency import paired_ratio
from onnx import TensorProto, helper, numpy_helper

HIDDEN, INTERMEDIATE = 640, 2048


def gated_mlp_stack(layers: int, merged: bool, seed: int = 0) -> bytes:
    # Same weights for both forms; std 0.01 keeps an 18-layer residual stream of random MLPs finite (0.03 overflowed).
    rng = np.random.default_rng(seed)
    nodes, weights, current = [], [], "x"
    for i in range(layers):
        gate = rng.standard_normal((HIDDEN, INTERMEDIATE), dtype=np.float32) * 0.01
        up = rng.standard_normal((HIDDEN, INTERMEDIATE), dtype=np.float32) * 0.01
        down = rng.standard_normal((INTERMEDIATE, HIDDEN), dtype=np.float32) * 0.01
        weights.append(numpy_helper.from_array(down, f"down{i}"))
        if merged:
            weights.append(numpy_helper.from_array(np.concatenate([gate, up], axis=1), f"gate_up{i}"))
            nodes += [helper.make_node("MatMul", [current, f"gate_up{i}"], [f"gu{i}"]),
                      helper.make_node("Split", [f"gu{i}"], [f"g{i}", f"u{i}"], axis=-1, num_outputs=2)]
        else:
            weights += [numpy_helper.from_array(gate, f"gate{i}"), numpy_helper.from_array(up, f"up{i}")]
            nodes += [helper.make_node("MatMul", [current, f"gate{i}"], [f"g{i}"]),
                      helper.make_node("MatMul", [current, f"up{i}"], [f"u{i}"])]
        nodes += [helper.make_node("Gelu", [f"g{i}"], [f"a{i}"], approximate="tanh"),
                  helper.make_node("Mul", [f"a{i}", f"u{i}"], [f"m{i}"]),
                  helper.make_node("MatMul", [f"m{i}", f"down{i}"], [f"d{i}"]),
                  helper.make_node("Add", [current, f"d{i}"], [f"x{i}"])]
        current = f"x{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "gated_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    x = np.random.default_rng(1).standard_normal((1, args.tokens, HIDDEN), dtype=np.float32)
    sessions = {}
    for name, merged in (("separate", False), ("merged", True)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions[name] = ort.InferenceSession(gated_mlp_stack(args.layers, merged), options,
                                              providers=["CPUExecutionProvider"])
    outputs = {name: s.run(None, {"x": x})[0] for name, s in sessions.items()}
    max_diff = float(np.abs(outputs["merged"] - outputs["separate"]).max())
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"x": x})
            times[name].append(time.perf_counter() - start)
    ratio = paired_ratio(times["merged"], times["separate"])
    medians = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    print(f"separate {medians['separate']:.1f} ms, merged {medians['merged']:.1f} ms, merged/separate "
          f"{ratio['median']:.3f} [{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}], max |diff| {max_diff:.2e}")
    write_results("gated_mlp", {"layers": args.layers, "tokens": args.tokens, "runs": args.runs, "threads": args.threads,
                                "ort": ort.__version__, "machine": machine(), "median_ms": medians,
                                "merged_over_separate": ratio, "max_abs_diff": max_diff})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
