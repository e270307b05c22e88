"""Exporter outputs qtc never made itself compile w8a16 and pass the post-compile check against the source:
the TorchScript exporter at an attribute-era opset, the dynamo exporter at the newest, and a transformers
model with sdpa attention (the bench/onnx_corpus.py run covers 78 such files)."""

import pytest
import torch
from torch import nn

import qtc


class TinyLm(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.norm = nn.LayerNorm(32)
        self.proj = nn.Linear(32, 32)

    def forward(self, ids):
        return self.proj(self.norm(self.embed(ids))) @ self.embed.weight.T


@pytest.mark.parametrize("dynamo, opset", [(False, 9), (True, 23)])
def test_torch_exports_compile_and_agree(tmp_path, dynamo, opset):
    torch.manual_seed(0)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(TinyLm().eval(), (torch.randint(0, 100, (1, 9)),), str(path), dynamo=dynamo,
                      opset_version=opset, input_names=["input"])
    check = qtc.compile(path, recipe="w8a16", quiet=True).report["post_compile_check"]
    assert check["source_run_by"] == "onnxruntime" and check["feed"] == {"input": [1, 9]}  # the static length
    assert min(check["cosine"].values()) > 0.98


def test_transformers_sdpa_export_compiles_and_agrees(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=False)[0]

    ids = torch.randint(0, 128, (1, 12))
    path = tmp_path / "llama.onnx"
    torch.onnx.export(Logits(), (ids, torch.ones_like(ids)), str(path), dynamo=True, opset_version=18,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"])
    check = qtc.compile(path, recipe="w8a16", quiet=True).report["post_compile_check"]
    assert check["source_run_by"] == "onnxruntime" and check["cosine"]["logits"] > 0.98
