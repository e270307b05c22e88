"""Budget-gated layer skipping: branch discovery, exact dense behaviour, real skipping, CLI contract."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qtc
from qtc.core.blocks import find_branches
from qtc.errors import QtcError
from qtc.measure.sweep import sweep
from qtc.passes.layerskip import LayerSkipSpec, level_of
from tests.cli.test_main import assert_bad_input
from tests.cli.test_main import qtc as run_cli

SPEC = LayerSkipSpec(budgets=(1.0, 0.9, 0.8, 0.7), metric="bi")
OPTIONS = dict(samples=4, seq_len=64, quiet=True)
FLOAT_RECIPE = "base: w8a16\nname: float\ndescription: nothing quantized\nop_types: []\n"


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(n=48, seed=1):
    ids = np.random.default_rng(seed).integers(3, 4000, size=(1, n))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _budget(value):
    return {"budget": np.array(value, dtype=np.float32)}


@pytest.fixture(scope="module")
def compiled(tiny_llama, chinese_corpus, tmp_path_factory):
    """w8a8 and float (nothing quantized), each with and without gates, from the same calibration windows."""
    folder = tmp_path_factory.mktemp("layerskip")
    (folder / "float.yaml").write_text(FLOAT_RECIPE)
    paths = {}
    for recipe in ("w8a8", "float"):
        for key, skip in ((recipe, None), (f"{recipe}-gated", SPEC)):
            # The ungated twin keeps residual Adds unfused too (fuse_residuals=False), as gating requires.
            result = qtc.compile(tiny_llama, recipe=recipe if recipe != "float" else folder / "float.yaml",
                                 calib=chinese_corpus, layer_skip=skip, fuse_residuals=False, **OPTIONS)
            paths[key] = result.save(folder / f"{key}.onnx")
            paths[f"{key}-report"] = result.report
    return paths


def test_branches_of_a_pre_norm_decoder(tiny_llama):
    branches = find_branches(ir.load(tiny_llama).graph)
    assert [b.name for b in branches] == [f"model.layers.{i}.{k}" for i in range(4) for k in ("attn", "mlp")]
    assert [b.kind for b in branches] == ["attention", "mlp"] * 4
    # The MLP branch holds its three projections and nothing of the attention.
    mlp = branches[1]
    assert sum(1 for n in mlp.body if n.op_type == "MatMul") == 3 and not any(n.op_type == "Softmax" for n in mlp.body)


def test_branches_of_a_post_norm_encoder():
    """BERT: norm(x + branch(x)); the LayerNorm after the Add stays outside the branch."""
    from qtc.models.reference import build_reference

    branches = find_branches(ir.load(build_reference("zh-sentiment")).graph)
    assert [b.kind for b in branches] == ["attention", "mlp"] * 2
    assert len({b.block for b in branches}) == 2
    for branch in branches:
        assert not any(n.op_type == "LayerNormalization" for n in branch.body)
        assert all(user.op_type == "LayerNormalization" for user, _ in branch.add.outputs[0].uses())


def _escaping_graph() -> ir.Model:
    """x + W2(relu(W1 x)) where W1 x is also a graph output (as a KV-cache write would be)."""
    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), n) for n in ("w1", "w2"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"]), helper.make_node("Add", ["x", "y"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8]) for n in ("out", "h")],
                              initializer=[w1, w2])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def test_values_read_outside_stay_outside_the_branch():
    (branch,) = find_branches(_escaping_graph().graph)
    assert [n.op_type for n in branch.body] == ["Relu", "MatMul"]  # the MatMul producing output `h` is not gated
    assert branch.cost == 64


@pytest.mark.parametrize("key", ["w8a8-gated", "float-gated"])
def test_budget_one_is_the_ungated_model(compiled, key):
    reference = _session(compiled[key.removesuffix("-gated")]).run(None, _feed())[0]
    gated = _session(compiled[key])
    assert np.abs(gated.run(None, _feed())[0] - reference).max() <= 1e-6  # the default budget
    assert np.abs(gated.run(None, _feed() | _budget(1.0))[0] - reference).max() <= 1e-6
    assert np.abs(gated.run(None, _feed() | _budget(1.7))[0] - reference).max() <= 1e-6


def _without(model_path, names: set[str]) -> ir.Model:
    """The ungated compiled model with the named branches removed outright (the stream passes by)."""
    model = ir.load(model_path)
    for branch in find_branches(model.graph):
        if branch.name in names:
            ir.convenience.replace_all_uses_with(branch.add.outputs[0], branch.stream)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return model


def test_lower_budget_skips_exactly_the_table(compiled, tmp_path):
    report = compiled["w8a8-gated-report"]["layer_skip"]
    gated = _session(compiled["w8a8-gated"])
    dense = gated.run(None, _feed())[0]
    names = [b["name"] for b in report["branches"]["list"]]
    for budget in (0.9, 0.75, 0.7):
        row = report["table"][level_of(tuple(report["budgets"]), budget)]
        skipped = {n for n, s in zip(names, row) if s}
        assert skipped, "a budget below 1.0 skips something"
        out = gated.run(None, _feed() | _budget(budget))[0]
        assert np.abs(out - dense).max() > 1e-3
        removed = tmp_path / f"removed-{budget}.onnx"
        ir.save(_without(compiled["w8a8"], skipped), removed, external_data=removed.name + ".data")
        assert np.abs(out - _session(removed).run(None, _feed())[0]).max() <= 1e-5


def test_report_counts_quantized_nodes_inside_the_gates(compiled):
    """The quantized MatMuls move into If branches; the report still counts them (it read only the top graph)."""
    gated, flat = compiled["w8a8-gated-report"]["compiled"], compiled["w8a8-report"]["compiled"]
    assert gated["quantized_nodes_by_op"] == flat["quantized_nodes_by_op"] and gated["quantized_nodes_by_op"]["MatMul"]


def test_table_meets_each_budget_and_is_recorded(compiled):
    report = compiled["w8a8-gated-report"]["layer_skip"]
    assert report["budgets"] == [1.0, 0.9, 0.8, 0.7]
    for row, static in zip(report["realized"], report["static_shortgpt"]["realized"]):
        assert 1 - row["branch_sparsity"] <= row["budget"] + 1e-9
        assert 1 - static["branch_sparsity"] <= static["budget"] + 1e-9
    assert report["realized"][0]["skipped_branches"] == 0
    assert [r["budget"] for r in report["range_check"]] == report["budgets"]
    props = {p.key: p.value for p in onnx.load(str(compiled["w8a8-gated"]), load_external_data=False).metadata_props}
    assert json.loads(props["qtc.layer_skip.table"]) == report["table"]
    assert len(json.loads(props["qtc.layer_skip.branches"])) == 8


def test_greedy_loss_tables(tiny_llama, chinese_corpus):
    spec = LayerSkipSpec(budgets=(1.0, 0.8), metric="loss", loss_windows=2)
    plan = qtc.compile(tiny_llama, recipe="w8a8", calib=chinese_corpus, layer_skip=spec, compare=False,
                       **OPTIONS).report["layer_skip"]
    trace = plan["greedy_trace"]
    assert [t["budget"] for t in trace] == [1.0, 0.8] and trace[0]["skipped"] == []
    assert 1 - plan["realized"][1]["branch_sparsity"] <= 0.8 + 1e-9
    assert sorted(trace[1]["skipped"]) == sorted(n for n, s in zip([b["name"] for b in plan["branches"]["list"]],
                                                                   plan["table"][1]) if s)


def test_sweep_writes_table_json_and_png(compiled, tmp_path):
    result = run_cli("sweep", compiled["w8a8-gated"], "--task", "zh-news-ppl", "--budgets", "1.0,0.7",
                     "--limit", "3", "--runs", "1", "--seq-len", "32", "-o", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "s.json").read_text())
    assert {(r["method"], r["budget"]) for r in data["rows"]} == {("qtc", 1.0), ("qtc", 0.7), ("static-shortgpt", 0.7)}
    dense = next(r for r in data["rows"] if r["method"] == "qtc" and r["budget"] == 1.0)
    assert dense["compute_sparsity"] == 0 and dense["metrics"]["bits_per_char"]["ci95"][0] < 20
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_sweep_scores_on_ray_as_in_process(compiled, tmp_path):
    """The budgets' scorings as Ray tasks on a local cluster: the same metrics as the in-process sweep."""
    ray = pytest.importorskip("ray")
    args = ([compiled["w8a8-gated"]], [1.0, 0.7], "zh-news-ppl")
    options = dict(limit=3, runs=1, seq_len=32, quiet=True)
    here = sweep(*args, **options)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        there = sweep(*args, **options, ray_address="local")
    finally:
        ray.shutdown()
    assert [r["metrics"] for r in there["rows"]] == [r["metrics"] for r in here["rows"]]


@pytest.mark.parametrize("args, fragment", [
    (["--layer-skip", "--budgets", "1.5"], "--budgets takes comma-separated numbers in (0, 1]"),
    (["--layer-skip", "--budgets", "0.9,x"], "--budgets takes comma-separated numbers"),
    (["--budgets", "0.9"], "need --layer-skip"),
])
def test_compile_rejects_bad_budgets(case, args, fragment):
    result = run_cli("compile", case["model"], "--calib", case["corpus"], "-o", case["out"], *args)
    assert_bad_input(result, fragment)
    assert not case["out"].exists()


@pytest.mark.parametrize("options, message", [
    ({"budgets": (1.0, 1.5)}, r"--budgets must be numbers in \(0, 1\]"),
    ({"budgets": ()}, r"--budgets must be numbers in \(0, 1\]"),
    ({"budgets": (0.9, 0.9)}, "must not repeat a level"),
    ({"metric": "magic"}, "--skip-metric must be one of"),
])
def test_spec_rejects_what_the_api_is_given(options, message):
    # the Python API's check (the CLI refuses such budgets before building a spec)
    with pytest.raises(QtcError, match=message):
        LayerSkipSpec(**options)


def test_quantized_build_reuses_the_float_builds_table(compiled, tiny_llama, chinese_corpus):
    import dataclasses

    from qtc.passes.layerskip import skip_plan

    spec = dataclasses.replace(SPEC, table_from=compiled["float-gated"])
    result = qtc.compile(tiny_llama, recipe="w8a8", calib=chinese_corpus, layer_skip=spec, **OPTIONS)
    plan = result.report["layer_skip"]
    assert plan["table"] == skip_plan(compiled["float-gated"])["table"]
    assert plan["table_from"] == compiled["float-gated"].name and plan["greedy_trace"] is None


@pytest.mark.parametrize("args, fragment", [
    (["--layer-skip", "--budgets", "1.0,0.5", "--skip-table-from", "FLOAT_GATED"], "its budgets"),
    (["--layer-skip", "--skip-table-from", "UNGATED"], "has no budget gates"),
    (["--skip-table-from", "FLOAT_GATED"], "need --layer-skip"),
])
def test_compile_rejects_a_table_it_cannot_reuse(compiled, tiny_llama, chinese_corpus, tmp_path, args, fragment):
    where = {"FLOAT_GATED": str(compiled["float-gated"]), "UNGATED": str(compiled["float"])}
    out = tmp_path / "out.onnx"
    result = run_cli("compile", tiny_llama, "--calib", chinese_corpus, "--samples", "4", "--seq-len", "64", "-o", out,
                     *[where.get(a, a) for a in args])
    assert_bad_input(result, fragment)
    assert not out.exists()


def test_sweep_rejects_bad_input(compiled, tmp_path):
    assert_bad_input(run_cli("sweep", compiled["w8a8"], "--task", "zh-news-ppl", "-o", tmp_path / "s"), "no budget gates")
    assert_bad_input(run_cli("sweep", compiled["w8a8-gated"], "--task", "zh-news-ppl", "--budgets", "0", "-o",
                             tmp_path / "s"), "--budgets takes")
    assert not (tmp_path / "s.json").exists()



def test_range_warnings_name_the_levels_that_push_activations_further():
    from qtc.passes.layerskip import _range_warnings

    rows = [{"budget": b, "activations": 16, "clipping": c, "worst_ratio": w, "worst_activation": "mul_9"}
            for b, c, w in ((1.0, 10, 1.016), (0.9, 8, 1.01), (0.8, 7, 1.048))]
    (warning,) = _range_warnings(rows)
    assert warning.startswith("layer skip at budget 0.8:") and "x1.05" in warning


def test_parity_feeds_the_budget(compiled, tiny_llama):
    """`qtc parity --feed budget=B`: at 1.0 the gated model is its ungated twin; at 0.7 branches really are skipped."""
    from qtc.measure.parity import parity

    def max_diff(budget: float) -> float:
        result = parity(compiled["w8a8-gated"], ["cpu"], against=compiled["w8a8"], feed={"budget": budget}, samples=2,
                        tokenizer=str(tiny_llama.parent / "tokenizer.json"))
        assert result["feed"] == {"budget": pytest.approx(budget)}
        return result["against"]["outputs"]["logits"]["max_abs_diff"]

    assert max_diff(1.0) <= 1e-5
    assert max_diff(0.7) > 1e-3
