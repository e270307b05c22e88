"""Exporter outputs for the any-ONNX corpus: small PyTorch modules and randomly initialised transformers models,
each exported by the TorchScript-based exporter (`dynamo=False`, several opsets) and by the dynamo exporter.

    nice python bench/exporter_models.py OUT_DIR        # then: python bench/onnx_corpus.py --extra OUT_DIR/*.onnx

Weights are seeded (torch.manual_seed(0)), nothing is downloaded: transformers models come from small configs.
A module an exporter cannot export is listed in OUT_DIR/export_failures.json, not silently dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

LEGACY_OPSETS = (9, 13, 17)
# nn.TransformerEncoderLayer / MultiheadAttention in eval mode take a fused fast path the TorchScript exporter
# cannot export at any opset; the plain path is the same computation.
torch.backends.mha.set_fastpath_enabled(False)
DYNAMO_OPSETS = (18, 23)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))

    def forward(self, x):
        return self.net(x)


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class MobileBlock(nn.Module):
    """Depthwise-separable convolution with hardswish and a residual, as in MobileNet."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.act = nn.Hardswish()

    def forward(self, x):
        return x + self.pointwise(self.act(self.depthwise(x)))


class Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.conv = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        y = self.up(x)
        z = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return torch.sigmoid(self.conv(torch.cat([y, z], dim=1)))


class Lstm(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Gru(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(16, 24, batch_first=True, bidirectional=True)

    def forward(self, x):
        return self.rnn(x)[0]


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class TinyLm(nn.Module):
    """Embedding -> LayerNorm -> Linear -> tied head, softmax over the vocabulary."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.norm = nn.LayerNorm(32)
        self.proj = nn.Linear(32, 32)

    def forward(self, ids):
        h = self.proj(self.norm(self.embed(ids)))
        return torch.softmax(h @ self.embed.weight.T, dim=-1)


class Conv1dNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 5, padding=2)
        self.norm = nn.GroupNorm(4, 16)

    def forward(self, x):
        return nn.functional.silu(self.norm(self.conv(x)))


MODULES = {
    "mlp": (Mlp, lambda: (torch.randn(2, 32),)),
    "cnn": (Cnn, lambda: (torch.randn(1, 3, 16, 16),)),
    "mobile_block": (MobileBlock, lambda: (torch.randn(1, 8, 12, 12),)),
    "upsampler": (Upsampler, lambda: (torch.randn(1, 4, 8, 8),)),
    "lstm": (Lstm, lambda: (torch.randn(1, 6, 16),)),
    "gru": (Gru, lambda: (torch.randn(1, 6, 16),)),
    "encoder": (Encoder, lambda: (torch.randn(1, 7, 32),)),
    "attention": (Attention, lambda: (torch.randn(1, 7, 32),)),
    "tiny_lm": (TinyLm, lambda: (torch.randint(0, 100, (1, 9)),)),
    "conv1d_norm": (Conv1dNorm, lambda: (torch.randn(1, 8, 20),)),
}

TRANSFORMERS = {  # small configs of the families users export; random weights
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128)),
    "bert": ("BertConfig", "BertModel", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4, vocab_size=128)),
}


class LogitsOnly(nn.Module):
    """A transformers model called with ids and mask, returning its first output (no cache objects)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=False)
        return out[0]


def transformers_modules():
    import transformers

    for name, (config_name, model_name, kwargs) in TRANSFORMERS.items():
        for attention in ("eager", "sdpa"):
            torch.manual_seed(0)
            config = getattr(transformers, config_name)(**kwargs, attn_implementation=attention)
            model = getattr(transformers, model_name)(config).eval()
            ids = torch.randint(0, 128, (1, 12))
            yield f"hf_{name}_{attention}", LogitsOnly(model), (ids, torch.ones_like(ids))


def torch_modules():
    for name, (cls, example) in MODULES.items():
        torch.manual_seed(0)
        yield name, cls().eval(), example()


def export(module, args, path: Path, dynamo: bool, opset: int) -> None:
    names = ["input_ids", "attention_mask"] if len(args) == 2 else ["input"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=dynamo, opset_version=opset, input_names=names,
                          external_data=False, **({} if dynamo else {"do_constant_folding": True}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failures = {}
    for name, module, example in [*torch_modules(), *transformers_modules()]:
        runs = [(False, o) for o in LEGACY_OPSETS] + [(True, o) for o in DYNAMO_OPSETS]
        for dynamo, opset in runs:
            path = args.out / f"{name}.{'dynamo' if dynamo else 'legacy'}.opset{opset}.onnx"
            if path.exists():
                continue
            try:
                export(module, example, path, dynamo, opset)
                print(f"exported {path.name}", flush=True)
            except Exception as exc:  # noqa: BLE001 - an exporter's failure is a fact to record, not ours to fix
                path.unlink(missing_ok=True)
                failures[path.name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                print(f"cannot export {path.name}: {failures[path.name]}", file=sys.stderr, flush=True)
    (args.out / "export_failures.json").write_text(json.dumps(failures, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
