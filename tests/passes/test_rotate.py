"""Residual rotation (recipe `rotate: hadamard`): the float model computes the same logits and KV cache, prefill
and decode, untied and tied, with q/k/v biases; the online Hadamard stays float under a w8a8 recipe; graphs a
rotation does not commute with are refused with the reason."""

import dataclasses

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qtc.calibration.data import model_inputs, next_step_feed, text_feed
from qtc.errors import QtcError
from qtc.frontends.decoder import DecoderConfig, build_decoder
from qtc.models.synthetic import RandomWeights
from qtc.passes.annotate import AnnotateQuantizationPass, annotated_nodes
from qtc.passes.canonicalize import canonicalize_passes
from qtc.passes.meta import ROTATION
from qtc.passes.rotate import RotateResidualPass, residual_rotation
from qtc.recipes import builtin_recipe, parse_recipe

CFG = DecoderConfig(family="qwen2", vocab_size=80, hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96,
                    head_size=12, qkv_bias=True)


class Weights(RandomWeights):
    """RandomWeights with norm scales away from one (so folding them is tested), any norm the layout names."""

    def __getitem__(self, name: str) -> np.ndarray:
        if name.endswith("norm.weight"):
            size = self.cfg.head_size if ("q_norm" in name or "k_norm" in name) else self.cfg.hidden
            rng = np.random.default_rng(len(name) * 7919 + sum(map(ord, name)))
            return (1.0 + 0.3 * rng.standard_normal(size)).astype(np.float32)
        if name == "lm_head.weight" and self.cfg.tied:
            raise KeyError(name)
        return super().__getitem__(name)


def _model(cfg: DecoderConfig) -> ir.Model:
    model = ir.from_proto(build_decoder(cfg, Weights(cfg, seed=5)))
    ir.passes.PassManager(canonicalize_passes(21))(model)
    return model


def _runs(model: ir.Model, prompt: np.ndarray, steps: int) -> list[dict]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs, names = model_inputs(model), [o.name for o in session.get_outputs()]
    feed = text_feed(prompt, inputs)
    runs = [dict(zip(names, session.run(None, feed)))]
    for step in range(steps):
        token = np.array([[int(runs[-1]["logits"][0, -1].argmax())]], np.int64)
        feed = next_step_feed(feed, runs[-1], token, prompt.size + step, inputs)
        runs.append(dict(zip(names, session.run(None, feed))))
    return runs


def test_rotation_is_orthogonal_for_sizes_without_a_hadamard_matrix():
    for hidden in (48, 64, 896):
        q = residual_rotation(hidden, seed=1)
        np.testing.assert_allclose(q @ q.T, np.eye(hidden), atol=1e-10)
        assert np.abs(q).max() < 0.9  # dense: every output mixes many inputs


@pytest.mark.parametrize("tied", [False, True])
def test_rotated_float_model_computes_the_same_logits_and_cache(tied):
    cfg = dataclasses.replace(CFG, tied=tied)
    plain, rotated = _model(cfg), _model(cfg)
    RotateResidualPass()(rotated)
    done = rotated.meta[ROTATION]
    assert (done["norms_folded"], done["writers"], done["online_hadamard"]) == (2 * cfg.layers + 1, 2 * cfg.layers, cfg.layers)
    prompt = np.array([3, 14, 15, 9, 26, 5], np.int64)
    want_runs, got_runs = _runs(plain, prompt, 3), _runs(rotated, prompt, 3)
    for want, got in zip(want_runs, got_runs, strict=True):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-4, err_msg=name)
    # the rotation really moved the weights (not a no-op): the embedding table changed
    table = lambda m: next(n for n in m.graph if n.op_type == "Gather").inputs[0].const_value.numpy()  # noqa: E731
    assert np.abs(table(rotated) - table(plain)).max() > 1e-2


def test_online_hadamard_stays_float_under_w8a8():
    model = _model(CFG)
    RotateResidualPass()(model)
    AnnotateQuantizationPass(builtin_recipe("w8a8"))(model)
    quantized = {node.name for node, _ in annotated_nodes(model.graph)}
    online = [n.name for n in model.graph if n.name.endswith("online_hadamard/MatMul")]
    assert len(online) == CFG.layers and not quantized & set(online)
    assert sum("down_proj" in name for name in quantized) == CFG.layers  # the down projections themselves are


def test_post_branch_norms_are_refused_with_the_reason():
    gemma_like = dataclasses.replace(CFG, sandwich_norms=True, qkv_bias=False)
    with pytest.raises(QtcError, match="does not commute with a rotation"):
        RotateResidualPass()(_model(gemma_like))


def test_w8a8_rot_compiles_a_kv_decoder_and_refuses_a_model_without_one_embedding(kv_decoder, tmp_path):
    import qtc

    result = qtc.compile(kv_decoder, recipe="w8a8-rot", calib="zh-news", samples=2, seq_len=64)
    assert result.report["rotation"]["online_hadamard"] == 4  # zh-tiny-lm: 4 layers, one down projection each
    assert result.report["heldout_comparison"]["outputs"]["logits"]["top1_agreement"] > 0.95
    result.save(tmp_path / "rot" / "model.onnx")
    with pytest.raises(QtcError, match="rotate:"):
        qtc.compile(_cnn(tmp_path), recipe=parse_recipe({"base": "w8a16", "name": "w8a16-rot", "rotate": "hadamard"}))


def _cnn(tmp_path):
    from onnx import TensorProto, helper, numpy_helper, save

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "cnn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [weight])
    path = tmp_path / "cnn.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path
