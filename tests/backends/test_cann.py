"""The CANN facts qtc relies on, checked against data dumped from the real onnxruntime-cann 1.24.4 wheel.

backends/cann_kernels.json is produced by tools/cann_wheel_check.py (`registry`: the CANN EP kernel registry via
get_all_opkernel_def(), single-op mode; `graph-whitelist`: SupportONNXModel()'s op whitelist read out of the
provider library, graph mode with enable_cann_subgraph=1). CPU only: no Ascend hardware and no CANN wheel needed.
"""

import json
from pathlib import Path

import pytest
from onnx import defs

import qtc.backends

KERNELS = json.loads((Path(qtc.backends.__file__).parent / "cann_kernels.json").read_text())
REGISTRY: dict[str, list[dict]] = {}
for _k in KERNELS["kernels"]:
    REGISTRY.setdefault(_k["op_type"], []).append(_k)
WHITELIST = set(KERNELS["graph_whitelist"]["ops"])

# Fusing into these is wrong for `cann`: neither the kernel registry nor the graph-mode whitelist has them.
NOT_ON_CANN = ["QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
               "If", "Loop", "LayerNormalization", "Gelu", "Attention", "RMSNormalization", "RotaryEmbedding"]


def kernel_matches(op: str, opset: int, dtype: str | None = "tensor(float)") -> bool:
    """Would the single-op CANN EP take an `op` node of a model at `opset` (with a `dtype` input)?

    ORT's KernelRegistry rule: a kernel registered open-ended "since N" matches only nodes whose schema
    since-version is exactly N; a closed range [a, b] matches since-versions a..b.
    """
    since = defs.get_schema(op, opset, "").since_version
    for kernel in REGISTRY.get(op, []):
        start, end = kernel["since_version"]
        if not (start == since or (end is not None and start < since <= end)):
            continue
        if dtype is None or any(dtype in types for types in kernel["type_constraints"].values()):
            return True
    return False


def test_dumped_from_the_wheel():
    assert KERNELS["wheel"] == "onnxruntime-cann==1.24.4"
    assert "get_all_opkernel_def" in KERNELS["produced_by"]
    assert {k["domain"] for k in KERNELS["kernels"]} == {"ai.onnx"}  # no com.microsoft kernels at all
    assert len(REGISTRY) == len(KERNELS["single_op_kernels"]) >= 30


@pytest.mark.parametrize("op", NOT_ON_CANN + ["Softmax", "MatMulNBits", "SkipLayerNormalization"])
def test_no_single_op_kernel(op):
    assert op not in REGISTRY


@pytest.mark.parametrize("op", NOT_ON_CANN)
def test_not_in_graph_whitelist(op):
    assert op not in WHITELIST


def test_graph_whitelist_recovered_whole():
    wl = KERNELS["graph_whitelist"]
    assert wl["complete"] and wl["count"] == len(WHITELIST) == 134
    assert wl["opset_lower_bound"] == 8
    # the primitives qtc decomposes into for `cann` are all on it
    assert {"MatMul", "Gemm", "Add", "Mul", "Sub", "Div", "Pow", "Sqrt", "ReduceMean", "Erf", "Tanh", "Sigmoid",
            "Softmax", "Reshape", "Transpose", "Gather", "Concat", "Slice", "Where", "Cast"} <= WHITELIST


@pytest.mark.parametrize("opset", [9, 13, 17, 21])
def test_float_matmul_runs_on_cann(opset):
    assert kernel_matches("MatMul", opset)
    assert not kernel_matches("MatMul", opset, "tensor(int8)")  # no int8 GEMM in single-op mode


@pytest.mark.parametrize("op, opset, expected", [
    ("Transpose", 12, True), ("Transpose", 13, False),      # registered open-ended since 1: Transpose-13 misses
    ("Reshape", 13, True), ("Reshape", 14, True), ("Reshape", 19, False), ("Reshape", 21, False),
    ("MaxPool", 7, True), ("MaxPool", 8, False), ("MaxPool", 12, False),  # only [1, 7]
    ("Cos", 21, True), ("Cos", 22, False),
    ("Add", 7, True), ("Add", 13, True), ("Add", 14, True), ("Add", 21, True),
    ("Cast", 13, True), ("Cast", 19, False),
    ("Identity", 19, True), ("Identity", 21, False),
])
def test_exact_since_version_rule(op, opset, expected):
    assert kernel_matches(op, opset) is expected


def test_exact_since_version_kernel_matching():
    """qtc.backends.cann's own matcher (the placement estimate uses it) follows the same rule."""
    from qtc.backends.cann import kernel_matches as placement_matches

    assert placement_matches(((13, None),), 13) and not placement_matches(((13, None),), 14)
    assert placement_matches(((7, 12),), 11) and not placement_matches(((1, None),), 13)


@pytest.mark.parametrize("op", ["Exp", "Gemm"])
def test_float16_only_kernels(op):
    assert kernel_matches(op, 13, "tensor(float16)")
    assert not kernel_matches(op, 13, "tensor(float)")


def test_stored_summary_agrees_with_the_rule():
    """single_op_kernels.matched_at_opsets (written by the dump) is the same rule applied to the same kernels."""
    for op in ("MatMul", "Transpose", "Reshape", "MaxPool", "Cos", "Gemm"):
        summary = KERNELS["single_op_kernels"][op]
        stored = {o for a, b in summary["matched_at_opsets"] for o in range(a, b + 1)}
        for opset in range(7, 22):
            assert (opset in stored) is kernel_matches(op, opset, None), (op, opset)


def test_provider_option_defaults_match_the_wheel():
    from qtc.backends.cann import CANN_OPTIONS

    assert CANN_OPTIONS == KERNELS["provider_options_defaults"]
    assert "Unknown provider option" in KERNELS["unknown_provider_option"]
