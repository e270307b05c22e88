"""Agreement statistics and the compile's checks: sliced sums in float64, one session per model when shared."""

import threading

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import qtc
from qtc.backends import base, compare, get_backend
from qtc.calibration.data import load_calibration, model_inputs, tokenizer_beside
from qtc.util.arrays import log_softmax
from tests import graphs


def test_sliced_statistics_equal_whole_array_float64(monkeypatch):
    monkeypatch.setattr(compare, "_SLICE", 1000)  # many slices (and row blocks) on a small output
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 7, 900), dtype=np.float32) * 4
    out = ref + rng.standard_normal(ref.shape, dtype=np.float32) * 0.5
    stats = compare.OutputStats()
    stats.update(ref, out, logits=True)
    got = stats.result()
    r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    # float32 products (each rounded by <= 6e-8) summed in float64, float32 exponentials: the float64 figures to
    # ~1e-9 here (12,600 elements; less on a real output's millions), not to the last bit
    assert got["cosine"] == pytest.approx(r @ o / np.sqrt((r @ r) * (o @ o)), rel=1e-9)
    assert got["max_abs_diff"] == pytest.approx(np.abs(r - o).max(), rel=1e-12)
    assert got["p99.9_rel_diff"] == pytest.approx(np.percentile(np.abs(r - o) / np.maximum(np.abs(r), 1e-6), 99.9), rel=1e-5)
    assert got["top1_agreement"] == np.mean(ref.argmax(-1) == out.argmax(-1))
    lr, lo = log_softmax(ref), log_softmax(out)
    assert got["kl_per_position"] == pytest.approx((np.exp(lr) * (lr - lo)).sum() / 14, rel=1e-6)


def test_statistics_on_threads_equal_a_sequential_loops_to_the_bit(monkeypatch):
    """The slices' partial sums are added in slice order whichever thread finished first."""
    monkeypatch.setattr(compare, "_SLICE", 1000)
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((3, 5, 2000), dtype=np.float32) * 3
    out = ref + rng.standard_normal(ref.shape, dtype=np.float32) * 0.2
    threaded = compare.OutputStats()
    threaded.update(ref, out, logits=True)
    monkeypatch.setattr(compare, "_in_threads", lambda work, starts: [work(start) for start in starts])
    sequential = compare.OutputStats()
    sequential.update(ref, out, logits=True)
    assert threaded.result() == sequential.result()


def test_statistics_taken_beside_the_next_run_equal_a_sequential_loops(kv_decoder):
    """compare_models takes a sample's statistics on a thread while the next sample runs; added in order, they are
    the figures of running and accumulating one sample after another, to the bit."""
    compiled = qtc.compile(kv_decoder, recipe="w8a8", calib="zh-news", samples=2, seq_len=16, quiet=True).model
    calib = load_calibration("zh-news", tokenizer=tokenizer_beside(kv_decoder), n_samples=4, seq_len=16, seed=3)
    feeds = list(calib.feeds(model_inputs(ir.load(kv_decoder))))
    backend = get_backend("cpu")
    got = compare.compare_models(backend, kv_decoder, compiled, feeds)
    reference, candidate = backend.session(kv_decoder), backend.session(compiled)
    names = [o.name for o in reference.get_outputs()]
    stats = {name: compare.OutputStats() for name in names}
    for feed in feeds:
        for name, expected, out in zip(names, reference.run(names, feed), candidate.run(names, feed)):
            stats[name].update(expected, out, logits="logit" in name)
    assert got == {"samples": 4, "outputs": {name: s.result() for name, s in stats.items()}}
    assert got["outputs"]["logits"]["cosine"] < 1


def test_a_compile_loads_the_source_and_the_output_once_for_its_checks(kv_decoder, monkeypatch):
    """The post-compile check and the held-out comparison share one session per model where both fit, with the
    same figures as the separate sessions (and temporary files) used where they do not."""
    opened = []
    original = base._inference_session
    monkeypatch.setattr(base, "_inference_session",
                        lambda *args: opened.append(threading.current_thread().name) or original(*args))
    options = {"recipe": "w8a8", "calib": "zh-news", "samples": 2, "seq_len": 32, "quiet": True}
    shared = qtc.compile(kv_decoder, **options)
    # calibration's session, then the source and the output once each (the output's also wrote ORT's optimized
    # graph for runtime_ops); the source's on its own thread, after calibration
    assert len(opened) == 3 and opened.count("qtc-open-ahead") == 1 and opened[0] != "qtc-open-ahead"
    opened.clear()
    # a limit under which the two sessions are not held together (nor is anything spilled or segmented)
    apart = qtc.compile(kv_decoder, memory_limit=7 * shared.report["size"]["source_tensor_bytes"], **options)
    # the check's source twice (does it run; its outputs), the held-out pair again, runtime_ops' own session
    assert len(opened) == 7
    for key in ("post_compile_check", "heldout_comparison", "runtime_ops"):
        assert shared.report[key] == apart.report[key]
    assert shared.report["memory"]["check_peak_rss_bytes"].keys() >= {"post_compile_check", "heldout_comparison"}
    assert shared.report["seconds"]["checks"]["heldout_comparison"] > 0


def test_a_session_of_some_values_runs_only_the_nodes_they_need(monkeypatch):
    """`only`: the session's graph is what the named values need (no LM head, no head weight written), its values
    equal the full graph's, and the model is put back byte for byte."""
    model = graphs.tiny_lm()
    before = ir.to_proto(model).SerializeToString()
    given = []
    original = base._inference_session

    def opened(path, *args):
        given.append(onnx.load(path, load_external_data=False))
        return original(path, *args)

    monkeypatch.setattr(base, "_inference_session", opened)
    backend = get_backend("cpu")
    feed = graphs.random_feed(model)
    session = compare.session_with_outputs(backend, model, ["mlp_out", "h"], only=True)
    graph = given[-1].graph
    assert [o.name for o in graph.output] == ["h", "mlp_out"]
    assert [n.name for n in graph.node] == ["embed", "mlp", "act"]
    assert sorted(i.name for i in graph.initializer) == ["table", "w_mlp"]
    full = compare.session_with_outputs(backend, model, ["h"])
    assert [n.name for n in given[-1].graph.node] == ["embed", "mlp", "act", "head"]
    np.testing.assert_array_equal(session.run(["h"], feed)[0], full.run(["h"], feed)[0])
    assert ir.to_proto(model).SerializeToString() == before


def test_the_nodes_a_value_needs_include_what_a_branch_reads_from_outside():
    x, flag = graphs.tensor_input("x", [4]), graphs.tensor_input("flag", [], ir.DataType.BOOL)
    relu = graphs.node("Relu", [x], "relu", "r")
    unused = graphs.node("Neg", [x], "unused", "n")
    branch_out = ir.Value(name="then_out", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
    inner = ir.node("Identity", [relu.outputs[0]], name="inner", outputs=[branch_out])
    then_branch = ir.Graph([], [branch_out], nodes=[inner], name="then")
    other = graphs.node("Identity", [x], "other", "else_out")
    else_branch = ir.Graph([], other.outputs, nodes=[other], name="else")
    gate = ir.node("If", [flag], {"then_branch": then_branch, "else_branch": else_branch}, name="gate",
                   outputs=[ir.Value(name="y")])
    model = graphs.model_of([x, flag], [gate.outputs[0], unused.outputs[0]], [relu, unused, gate], [])
    needed = compare.needed_nodes(model.graph, [model.graph.outputs[0]])
    assert {node.name for node in needed} == {"relu", "gate"}


def test_a_compiles_sessions_do_not_spin_and_a_servers_do(kv_decoder, monkeypatch):
    """ORT's workers spin after a run by default, which takes the cores from the numpy work a compile does between
    its runs; every session a compile opens turns spinning off, a session opened outside a compile keeps it."""
    spinning = []
    original = base._inference_session

    def opened(model, options, providers):
        try:
            spinning.append(options.get_session_config_entry("session.intra_op.allow_spinning"))
        except RuntimeError:  # not set: ORT's default (spinning)
            spinning.append(None)
        return original(model, options, providers)

    monkeypatch.setattr(base, "_inference_session", opened)
    qtc.compile(kv_decoder, recipe="w8a8", calib="zh-news", samples=2, seq_len=32, quiet=True)
    assert len(spinning) >= 3 and set(spinning) == {"0"}
    spinning.clear()
    get_backend("cpu").session(kv_decoder)
    assert spinning == [None]
