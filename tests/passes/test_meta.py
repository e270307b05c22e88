"""passes/meta.py: the typed notes passes leave in model.meta / node.meta, and the report sections made of them."""

import json

import onnx_ir as ir

from qtc.passes import meta
from qtc.passes.annotate import AnnotateQuantizationPass
from qtc.recipes import builtin_recipe
from tests import graphs


def test_warn_accumulates_in_order():
    model = graphs.mlp()
    meta.warn(model, "first")
    meta.warn(model, "second", "third")
    assert model.meta[meta.WARNINGS] == ["first", "second", "third"]
    assert meta.report_sections(model)["warnings"] == ["first", "second", "third"]


def test_quantized_counts_by_op_and_kept_roles():
    model = graphs.tiny_lm()
    assert meta.quantized_counts(model) == {"quantized_nodes_by_op": {}, "kept_float_roles": {}}  # nothing decided yet
    AnnotateQuantizationPass(builtin_recipe("w8a8"))(model)
    assert meta.quantized_counts(model) == {"quantized_nodes_by_op": {"MatMul": 1},
                                            "kept_float_roles": {"embed": "embedding", "head": "lm_head"}}
    assert model.meta[meta.ANNOTATED] == 1


def test_quantized_counts_are_sorted_by_op():
    model = graphs.mlp(shape=("batch",))
    up = next(n for n in model.graph if n.name == "up")
    gemm = ir.node("Gemm", [up.inputs[0], up.inputs[1]], name="gemm", outputs=[ir.Value(name="g")])
    model.graph.append(gemm)
    AnnotateQuantizationPass(builtin_recipe("w8a16"))(model)
    counts = meta.quantized_counts(model)["quantized_nodes_by_op"]
    assert counts == {"Gemm": 1, "MatMul": 2} and list(counts) == ["Gemm", "MatMul"]


def test_report_sections_of_an_untouched_model():
    sections = meta.report_sections(graphs.mlp())
    assert sections == {"activation_ranges": {}, "smoothing": None, "rounding": None, "fusions": {},
                        "legalization": None, "matmulnbits": None, "warnings": []}
    assert "layer_skip" not in sections


def test_report_sections_are_plain_data():
    model = graphs.mlp()
    model.meta[meta.OBSERVERS] = {("x", "percentile", 99.9): {"lo": -1.0, "hi": 2.0}, ("h", "minmax", None): {"lo": 0.0}}
    model.meta[meta.SMOOTHING] = {"x": {"alpha": 0.5}}
    model.meta[meta.SKIP_PLAN] = {"budgets": [1.0, 0.5]}
    sections = meta.report_sections(model)
    # tuple keys become JSON strings, so the report serializes
    assert sections["activation_ranges"] == {'["x", "percentile", 99.9]': {"lo": -1.0, "hi": 2.0},
                                             '["h", "minmax", null]': {"lo": 0.0}}
    assert sections["layer_skip"] == {"budgets": [1.0, 0.5]}
    assert meta.smoothing_of(model, "x") == {"alpha": 0.5} and meta.smoothing_of(model, "h") is None
    json.dumps(sections)
