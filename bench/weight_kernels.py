"""What weight-only quantized GEMMs cost on ORT CPU: MatMulNBits (8 and 4 bit, accuracy_level 1 and 4) vs float.

On the cpu target ORT fuses every weight-only DequantizeLinear -> MatMul into com.microsoft::MatMulNBits (qtc's
w8a16 and w4a16 layers, the w8a16 fallbacks of mixed recipes, the tied head of an `embedding:` table). Whether
that is fast depends on the kernel MLAS has for the bit width and accuracy level, so this times one node per
variant at Gemma-3-270m's shapes (the tied head 262,144 x 640, an MLP down projection 640 x 2,048) for a prefill
(256 tokens) and a decode step (1 token). Synthetic N(0, 0.05) weights and N(0, 1) activations (timing does not
depend on the values); the variants of one case run interleaved, round by round; ratio = median over rounds of
time / float MatMul's time, with a bootstrap 95 % interval. max |diff| is against the float product with the
*dequantized* weight: float rounding for kernels that keep activations in float (level 1), larger where they
are quantized to int8 per block on the fly (level 4).

    python bench/weight_kernels.py [--runs 10] [--threads N] [--cases head,mlp] [--tokens 256,1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, table, write_results  # noqa: E402
from fusion_latency import paired_ratio  # noqa: E402

NAME = "weight_kernels"
CASES = {"head": (262144, 640), "mlp": (640, 2048)}  # name -> (N, K): gemma-3-270m's tied head, an MLP down_proj
LEVELS = (1, 4)  # 1: float activations and accumulation; 4: activations int8 per block, integer dot products
BLOCK = 32


def block_quantize(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric blocks along K: MatMulNBits' packed uint8 [N, K/B, B*bits/8], its scales [N*K/B], and the dequantized weight."""
    n, k = weight.shape
    limit = 2 ** (bits - 1) - 1
    blocks = weight.reshape(n, k // BLOCK, BLOCK)
    scale = np.abs(blocks).max(-1) / limit
    codes = np.clip(np.round(blocks / scale[..., None]), -limit - 1, limit).astype(np.int32)
    dequantized = (codes * scale[..., None]).reshape(n, k).astype(np.float32)
    stored = (codes + 2 ** (bits - 1)).astype(np.uint8)  # MatMulNBits' default zero point: the grid's middle
    if bits == 4:
        pairs = stored.reshape(n, k // BLOCK, BLOCK // 2, 2)
        stored = pairs[..., 0] | (pairs[..., 1] << 4)
    return stored, scale.astype(np.float32).reshape(-1), dequantized


def one_node_model(node, initializers, n: int, k: int) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "tokens", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "tokens", n])], initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def variants(weight: np.ndarray) -> dict[str, tuple[bytes, np.ndarray]]:
    """label -> (serialized one-node model, the float weight its output should match)."""
    from onnx import helper, numpy_helper

    n, k = weight.shape
    out = {"float MatMul": (one_node_model(helper.make_node("MatMul", ["x", "w"], ["y"]),
                                           [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")], n, k), weight)}
    for bits in (8, 4):
        stored, scale, dequantized = block_quantize(weight, bits)
        inits = [numpy_helper.from_array(stored, "w"), numpy_helper.from_array(scale, "s")]
        for level in LEVELS:
            node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n,
                                    bits=bits, block_size=BLOCK, accuracy_level=level)
            out[f"int{bits} level {level}"] = (one_node_model(node, inits, n, k), dequantized)
    return out


def measure(case: str, tokens_list: list[int], runs: int, threads: int) -> list[dict]:
    import onnxruntime as ort

    n, k = CASES[case]
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    built = variants(weight)
    sessions = {label: ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
                for label, (model, _) in built.items()}
    results = []
    for tokens in tokens_list:
        x = rng.standard_normal((1, tokens, k)).astype(np.float32)
        errors = {label: float(np.abs(sessions[label].run(None, {"x": x})[0] - x @ reference.T).max())
                  for label, (_, reference) in built.items()}
        times: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(runs):
            for label, session in sessions.items():
                started = time.perf_counter()
                session.run(None, {"x": x})
                times[label].append(time.perf_counter() - started)
        for label, samples in times.items():
            results.append({"case": case, "n": n, "k": k, "tokens": tokens, "kernel": label,
                            "median_ms": 1000 * statistics.median(samples),
                            "ratio_to_float": paired_ratio(samples, times["float MatMul"]),
                            "max_abs_diff_vs_dequantized": errors[label]})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="interleaved rounds per case (default 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--tokens", default="256,1", help="comma list of token counts (default 256,1)")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if unknown := [c for c in cases if c not in CASES]:
        parser.error(f"unknown cases {unknown} (known: {', '.join(CASES)})")
    tokens = [int(t) for t in args.tokens.split(",")]
    results = [row for case in cases for row in measure(case, tokens, args.runs, args.threads)]
    rows = [[f"{r['case']} {r['n']}x{r['k']}", r["tokens"], r["kernel"], f"{r['median_ms']:.2f}",
             f"{r['ratio_to_float']['median']:.2f} [{r['ratio_to_float']['ci95'][0]:.2f}, {r['ratio_to_float']['ci95'][1]:.2f}]",
             f"{r['max_abs_diff_vs_dequantized']:.2g}"] for r in results]
    print(table(["weight N x K", "tokens", "kernel", "median ms", "ratio to float [95% CI]", "max |diff| vs dequantized"], rows))
    path = write_results(NAME, {"benchmark": NAME, "settings": vars(args), "machine": machine(), "results": results})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
