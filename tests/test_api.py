"""End to end on a real exported decoder and real Chinese text, through real ONNX Runtime sessions."""

import json
import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qtc
from qtc.backends import get_backend
from qtc.backends.base import max_ir_version
from qtc.backends.compare import compare_models
from qtc.calibration.data import load_calibration, model_inputs

SAMPLES, SEQ = 16, 128


@pytest.fixture(scope="module")
def compiled(tiny_llama, chinese_corpus, tmp_path_factory):
    """Both built-in recipes, compiled once from the corpus file, saved."""
    out = tmp_path_factory.mktemp("compiled")
    results = {}
    for recipe in ("w8a8", "w8a16"):
        result = qtc.compile(tiny_llama, recipe=recipe, calib=chinese_corpus, samples=SAMPLES, seq_len=SEQ, quiet=True)
        results[recipe] = (result, result.save(out / f"llama.{recipe}.onnx"))
    return results


@pytest.mark.parametrize("recipe", ["w8a8", "w8a16"])
def test_logits_agree_with_float_on_heldout_text(compiled, recipe):
    result, path = compiled[recipe]
    logits = result.report["heldout_comparison"]["outputs"]["logits"]
    assert result.report["heldout_comparison"]["samples"] >= 4
    assert logits["cosine"] >= 0.99, logits
    assert logits["top1_agreement"] >= 0.9, logits
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.arange(1, 33, dtype=np.int64).reshape(1, -1)
    (out,) = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert out.shape[:2] == (1, 32) and np.isfinite(out).all()


def test_w8a8_graph_is_quantized_as_the_recipe_says(compiled):
    result, path = compiled["w8a8"]
    model = ir.load(path)
    ops = [n.op_type for n in model.graph]
    matmuls_with_weights = result.report["compiled"]["quantized_nodes_by_op"]["MatMul"]
    assert matmuls_with_weights == 4 * 7  # q, k, v, o, gate, up, down per layer; the LM head stays float
    assert ops.count("QuantizeLinear") >= 4 * 4  # shared per activation: qkv input, o input, gate/up input, down input
    assert model.opset_imports[""] >= 21 and model.ir_version <= max_ir_version()
    # stored as uint8 (zero point 128) for the CPU EP, whose x86 kernels fuse only unsigned activations
    integer = [v for v in model.graph.initializers.values()
               if v.const_value.dtype in (ir.DataType.INT8, ir.DataType.UINT8) and v.const_value.shape.rank() == 2]
    assert len(integer) == 28
    assert result.report["runtime_ops"]["ops"]["com.microsoft::MatMulIntegerToFloat"] == 28  # every QDQ MatMul fused
    assert "DequantizeLinear" not in result.report["runtime_ops"]["ops"]
    # (a [1, d] row such as the rotary inverse frequencies is no weight matrix)
    float_matrices = [v.name for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT
                      and v.const_value.shape.rank() == 2 and min(v.const_value.shape) > 1]
    assert len(float_matrices) == 2  # embedding table and LM head: no float copy of any quantized weight
    assert set(result.report["compiled"]["kept_float_roles"].values()) == {"embedding", "lm_head"}


def test_provenance_in_model_and_sidecar(compiled, chinese_corpus):
    result, path = compiled["w8a8"]
    props = ir.load(path).metadata_props
    assert props["qtc.version"] == qtc.__version__
    assert json.loads(props["qtc.recipe"]) == qtc.load_recipe("w8a8").to_dict()
    assert props["qtc.calibration.sha256"] == result.report["calibration"]["sha256"]
    assert props["qtc.calibration.samples"] == str(SAMPLES) and props["qtc.calibration.seq_len"] == str(SEQ)
    assert props["qtc.calibration.calibrator"] == "minmax" and props["qtc.calibration.seed"] == "0"
    sidecar = json.loads(path.with_name("llama.w8a8.qtc.json").read_text())
    # 28 matrices shrink 4x; the float embedding and LM head (8.4 MB of the 20 MB) stay as they are
    assert sidecar["output"]["bytes"] < 0.6 * sidecar["size"]["source_file_bytes"]
    assert sidecar["heldout_comparison"] == json.loads(json.dumps(result.report["heldout_comparison"]))


def test_same_inputs_give_same_bytes(tiny_llama, chinese_corpus, tmp_path):
    paths = []
    for i in range(2):
        result = qtc.compile(tiny_llama, recipe="w8a8", calib=chinese_corpus, samples=4, seq_len=64, compare=False, quiet=True)
        paths.append(result.save(tmp_path / f"run{i}" / "m.onnx"))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_calibrators_all_run_and_differ(tiny_llama, chinese_corpus):
    calib = load_calibration(chinese_corpus, tokenizer=tiny_llama.parent / "tokenizer.json", n_samples=4, seq_len=64, seed=1)
    scales = {}
    for calibrator in ("minmax", "percentile", "entropy", "mse"):
        result = qtc.compile(tiny_llama, recipe="w8a8", calib=calib, calibrator=calibrator, compare=False, quiet=True)
        ranges = result.report["activation_ranges"]
        scales[calibrator] = sorted((k, v["hi"] - v["lo"]) for k, v in ranges.items())
        assert all(v["name"] == calibrator for v in ranges.values())
    widths = {c: sum(w for _, w in s) for c, s in scales.items()}
    assert widths["percentile"] < widths["minmax"] and widths["entropy"] < widths["minmax"]


def test_external_data_model_output_runs_and_matches(compiled, tiny_llama, tmp_path):
    """A copy of the model folder elsewhere (external data travels with it) compiles the same way."""
    _, w8a16 = compiled["w8a16"]
    moved = tmp_path / "moved"
    shutil.copytree(tiny_llama.parent, moved)
    backend = get_backend("cpu")
    calib = load_calibration("zh-news", tokenizer=moved / "tokenizer.json", n_samples=1, seq_len=64, seed=0)
    inputs = model_inputs(qtc.frontends.onnx_file.load_model(moved / "model.onnx"))
    stats = compare_models(backend, moved / "model.onnx", w8a16, calib.feeds(inputs, heldout=True))
    assert stats["outputs"]["logits"]["cosine"] > 0.99


def test_save_writes_a_quantization_card(tiny_llama, tmp_path):
    result = qtc.compile(tiny_llama, recipe="w8a8", calib="zh-news", samples=4, seq_len=32, quiet=True)
    result.save(tmp_path / "m.onnx")
    card = (tmp_path / "m.card.md").read_text(encoding="utf-8")
    assert card.startswith("# Quantization card: m.onnx") and "`zh-news:calib`, sha256 `" in card
    assert "4 windows of 32 tokens" in card and "| logits |" in card and "kept float: " in card
