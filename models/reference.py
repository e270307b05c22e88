"""Trained reference models, exported to ONNX from weights committed under `qtc/models/weights/`.

Unlike `tiny_llama` (random weights), these two models were trained on our Chinese workloads, so quantization
error shows up in a metric that means something:

- `zh-tiny-lm`: a Llama-style decoder (4 layers, hidden 256, 4 heads / 2 KV heads, SwiGLU 688, RoPE, RMSNorm,
  untied LM head, vocab 4096) trained as a causal LM on zh-news "calib"; metric: bits per character on
  zh-news "eval". Trained by `python tools/train_lm.py` (see its docstring).
- `zh-sentiment`: a BERT-style encoder (2 layers, hidden 128, GELU, post-LayerNorm, learned positions, 512 max)
  with masked mean pooling and a linear head, trained on zh-reviews "train", selected on "calib"; metric:
  accuracy on zh-reviews "eval". Trained by `python tools/train_sentiment.py` (see its docstring).

Both use the zh-news BPE tokenizer (4096 tokens, `qtc.models.tokenizer`), committed beside the weights as
`weights/zh-news-bpe4096.tokenizer.json` so that the weights never drift from the tokenizer they were trained with.

`build_reference(name)` never trains: it loads `weights/<name>.safetensors` (fp16, upcast to fp32) and the
config in `weights/<name>.json`, exports with the dynamo exporter into
`cache_dir("models", f"{name}-{key[:16]}")` as `model.onnx` + `model.onnx.data` (external data) +
`tokenizer.json` + `qtc_build.json`, checks ONNX Runtime's logits against torch's, and returns the path of
`model.onnx`. The key hashes the weights, config and tokenizer files, `EXPORT_VERSION` and the exporter stack's
versions; a complete folder with the same key is reused. The same inputs give byte-identical files.

ONNX interfaces (both: inputs `input_ids`, `attention_mask`, int64 [batch, seq], both dims dynamic):
- `zh-tiny-lm` -> `logits` float32 [batch, seq, 4096]; graph layout as `tiny_llama` (MatMul weights stored
  [in, out] under the parameter names). Feed `<bos>` (id 2) first; no KV cache.
- `zh-sentiment` -> `logits` float32 [batch, 2], label 1 = positive. No `<bos>`/`[CLS]`: feed the review's
  tokens as they are (at most 512), right padding with `attention_mask` 0.

`python -m qtc.models.reference NAME [--out DIR]` builds (or reuses) and prints the path of `model.onnx`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from qtc.errors import QtcError
from qtc.frontends.torch_export import export_hashes, export_ids_mask_model, exporter_versions
from qtc.models.tiny_llama import export_tiny_llama, make_tiny_llama
from qtc.models.tokenizer import BOS_ID, PAD_ID, UNK_ID
from qtc.util.cache import cache_dir, sha256_file, sha256_text
from qtc.util.files import write_json_atomic

# Bump when the export recipe of either model changes.
EXPORT_VERSION = "qtc-reference-1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TOKENIZER_FILE = WEIGHTS_DIR / "zh-news-bpe4096.tokenizer.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
BUILD_INFO = "qtc_build.json"
MAX_DIFF = 1e-3  # |ORT - torch| allowed on logits
LN2 = float(np.log(2.0))


@dataclass(frozen=True)
class ReferenceModel:
    name: str
    description: str
    task: str  # the `qtc eval` task that scores it
    metric: str  # the key of the headline metric in weights/<name>.json ["metric"]

    @property
    def weights(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.safetensors"

    @property
    def info(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.json"


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    m.name: m
    for m in (
        ReferenceModel(
            "zh-tiny-lm",
            "Llama-style causal LM (4 layers, hidden 256, GQA 4/2 heads, SwiGLU 688, RoPE, RMSNorm, vocab 4096, "
            "5.0M params) trained on zh-news calib; bits/char on zh-news eval",
            "zh-news-ppl",
            "bits_per_char",
        ),
        ReferenceModel(
            "zh-sentiment",
            "BERT-style encoder (2 layers, hidden 128, 4 heads, GELU 512, mean pooling, vocab 4096) sentiment "
            "classifier trained on zh-reviews train; accuracy on zh-reviews eval",
            "zh-reviews-acc",
            "accuracy",
        ),
    )
}


def get_reference(name: str) -> ReferenceModel:
    try:
        return REFERENCE_MODELS[name]
    except KeyError:
        raise QtcError(f"unknown reference model '{name}' (known: {', '.join(REFERENCE_MODELS)})") from None


def load_info(name: str) -> dict:
    ref = get_reference(name)
    for path in (ref.weights, ref.info, TOKENIZER_FILE):
        if not path.is_file():
            raise QtcError(f"reference model '{name}': missing {path} (retrain: python {_trainer(name)} in a checkout)")
    return json.loads(ref.info.read_text(encoding="utf-8"))


def _trainer(name: str) -> str:
    return "tools/train_lm.py" if name == "zh-tiny-lm" else "tools/train_sentiment.py"


def load_tokenizer(path: Path | None = None):

    return Tokenizer.from_file(str(path or TOKENIZER_FILE))


def versions() -> dict[str, str]:
    return exporter_versions()


# ---------------------------------------------------------------- torch models


def lm_config(info: dict) -> dict:
    """make_tiny_llama keyword arguments (plus vocab_size) from a weights JSON."""
    return dict(info["config"])


def make_lm(config: dict, *, seed: int = 0):
    """The zh-tiny-lm torch module (LlamaForCausalLM, eager attention, eval mode), randomly initialised."""
    config = dict(config)
    vocab_size = config.pop("vocab_size")
    return make_tiny_llama(vocab_size, seed=seed, **config)


def _make_classifier_class():
    import torch

    class ReviewClassifier(torch.nn.Module):
        """BertModel (no pooler) -> pooling over the attended tokens -> dropout -> Linear(features, 2).

        `pooling` "mean": the masked mean (hidden features); "mean+max": the masked mean and the masked max
        concatenated (2 x hidden features).
        """

        def __init__(self, bert_config, pooling: str = "mean"):
            super().__init__()
            from transformers import BertModel

            if pooling not in ("mean", "mean+max"):
                raise QtcError(f"unknown pooling {pooling!r}")
            self.pooling = pooling
            self.bert = BertModel(bert_config, add_pooling_layer=False)
            self.dropout = torch.nn.Dropout(bert_config.hidden_dropout_prob)
            features = bert_config.hidden_size * (2 if pooling == "mean+max" else 1)
            self.classifier = torch.nn.Linear(features, 2)

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            if self.pooling == "mean+max":
                masked = hidden.masked_fill(weights == 0, -1e4)
                pooled = torch.cat([pooled, masked.amax(1)], dim=-1)
            return self.classifier(self.dropout(pooled))

    # The class path lands in ONNX node metadata: pin it so every caller exports the same bytes.
    ReviewClassifier.__module__ = "qtc.models.reference"
    ReviewClassifier.__qualname__ = "ReviewClassifier"
    return ReviewClassifier


def bert_config(config: dict):
    from transformers import BertConfig


    return BertConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden"],
        num_hidden_layers=config["layers"],
        num_attention_heads=config["heads"],
        intermediate_size=config["intermediate"],
        hidden_act="gelu",
        hidden_dropout_prob=config.get("dropout", 0.1),
        attention_probs_dropout_prob=config.get("attention_dropout", 0.1),
        max_position_embeddings=config["max_positions"],
        type_vocab_size=1,
        pad_token_id=PAD_ID,
        layer_norm_eps=1e-12,
        attn_implementation="eager",
    )


def make_classifier(config: dict, *, seed: int = 0):
    """The zh-sentiment torch module (eval mode), initialised from `torch.manual_seed(seed)`."""
    import torch

    torch.manual_seed(seed)
    model = _make_classifier_class()(bert_config(config), config.get("pooling", "mean"))
    return model.eval()


def training_environment() -> dict:
    """Where and with what a reference model was trained, for its info file."""
    import torch
    import transformers

    return {"cpu_count": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "transformers": transformers.__version__, "deterministic": True}


def publish_weights(name: str, model, config: dict, info: dict) -> dict:
    """Write a trained model's fp16 weights and its info file (with the weights' sha256 and size) into weights/."""
    ref = get_reference(name)
    save_weights(model, ref.weights, {"name": name, "config": json.dumps(config, sort_keys=True)})
    info["weights_sha256"] = sha256_file(ref.weights)
    info["weights_bytes"] = ref.weights.stat().st_size
    write_json_atomic(ref.info, info)
    print(f"wrote {ref.weights} ({info['weights_bytes']:,} bytes) and {ref.info.name}")
    return info


def load_weights(model, path: Path) -> None:
    """Load fp16 safetensors into `model` (upcast to the parameters' fp32); every tensor must match."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise QtcError(f"{path.name}: weights do not fit the model (missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def save_weights(model, path: Path, metadata: dict[str, str]) -> None:
    """The model's state dict as fp16 safetensors (floating tensors only cast), written atomically."""
    import torch
    from safetensors.torch import save_file

    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def round_to_fp16_(model) -> None:
    """Round the floating parameters and buffers to fp16 precision in place (what the weights file keeps)."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.float16).to(t.dtype))


def load_torch_model(name: str):
    """The trained torch module of a reference model (fp32, eval mode) and its weights JSON."""
    info = load_info(name)
    ref = get_reference(name)
    model = make_lm(lm_config(info)) if name == "zh-tiny-lm" else make_classifier(info["config"])
    load_weights(model, ref.weights)
    return model.eval(), info


# ---------------------------------------------------------------- metrics (shared by training, tests, checks)

# logits_fn(ids [B, T] int64, mask [B, T] int64) -> logits float array ([B, T, V] for the LM, [B, 2] classifier)
LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def lm_windows(tokenizer, texts: Iterable[str], max_len: int = 256) -> tuple[list[np.ndarray], int]:
    """`<bos>` + each paragraph's tokens, cut into windows of at most `max_len` tokens that overlap by one token,
    so that every paragraph token is predicted exactly once (as `qtc eval --task zh-news-ppl` does); and the number
    of characters the predicted tokens cover (all of each paragraph's characters)."""
    windows, chars = [], 0
    for text in texts:
        ids = [BOS_ID, *tokenizer.encode(text, add_special_tokens=False).ids]
        chars += len(text)
        for start in range(0, max(len(ids) - 1, 1), max_len - 1):
            chunk = ids[start : start + max_len]
            if len(chunk) >= 2:
                windows.append(np.array(chunk, dtype=np.int64))
    return windows, chars


def pad_rows(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:

    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def _length_batches(rows: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def lm_nll_bits(logits_fn: LogitsFn, windows: Sequence[np.ndarray], batch_size: int = 16) -> tuple[float, int]:
    """Summed next-token NLL in bits over every window's targets (`window[1:]`), and the number of targets."""
    total, count = 0.0, 0
    for batch in _length_batches(windows, batch_size):
        rows = [windows[i] for i in batch]
        ids, mask = pad_rows(rows)
        logits = np.asarray(logits_fn(ids, mask), dtype=np.float64)[:, :-1]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        for j, row in enumerate(rows):
            n = len(row) - 1
            total += float(-logp[j, np.arange(n), row[1:]].sum()) / LN2
            count += n
    return total, count


def lm_bits_per_char(logits_fn: LogitsFn, tokenizer, texts: Sequence[str], max_len: int = 256,
                     batch_size: int = 16) -> dict:
    windows, chars = lm_windows(tokenizer, texts, max_len)
    bits, tokens = lm_nll_bits(logits_fn, windows, batch_size)
    return {"bits_per_char": bits / chars, "bits_per_token": bits / tokens, "perplexity": 2 ** (bits / tokens),
            "paragraphs": len(texts), "tokens": tokens, "chars": chars, "max_len": max_len}


def review_rows(tokenizer, texts: Iterable[str], max_len: int = 512) -> list[np.ndarray]:
    """Each review's tokens (no special tokens), truncated to `max_len`; an empty review becomes one <unk>."""
    rows = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids[:max_len] or [UNK_ID]
        rows.append(np.array(ids, dtype=np.int64))
    return rows


def classify(logits_fn: LogitsFn, rows: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Argmax label of each row (batches of similar length, right padding)."""
    preds = np.zeros(len(rows), dtype=np.int64)
    for batch in _length_batches(rows, batch_size):
        ids, mask = pad_rows([rows[i] for i in batch])
        preds[batch] = np.asarray(logits_fn(ids, mask)).argmax(-1)
    return preds


def torch_logits_fn(model) -> LogitsFn:
    import torch

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        return getattr(out, "logits", out).float().numpy()

    return run


def ort_logits_fn(onnx_path: Path, threads: int | None = None) -> LogitsFn:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]

    return run


# ---------------------------------------------------------------- export


def _export_classifier(model, path: Path) -> dict:
    config = model.bert.config
    return export_ids_mask_model(model, path, vocab_size=config.vocab_size, max_seq=config.max_position_embeddings)


def _check_batch(name: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Real text, right-padded, for the ORT-vs-torch check."""
    tok = load_tokenizer()
    texts = ["人民日报记者报道，今年我国经济继续保持稳定增长。", "这本书写得很好，值得一读！", "房间太小，服务也很差。"]
    rows = [np.array(tok.encode(t).ids, dtype=np.int64) for t in texts]
    if name == "zh-tiny-lm":

        rows = [np.concatenate([[BOS_ID], r]) for r in rows]
    ids, mask = pad_rows(rows)
    assert ids.max() < vocab_size
    return ids, mask


def max_abs_diff(name: str, model, onnx_path: Path, vocab_size: int) -> float:
    """Max |ORT - torch| over the logits of a padded real-text batch (attended positions only for the LM)."""
    ids, mask = _check_batch(name, vocab_size)
    expected = torch_logits_fn(model)(ids, mask)
    got = ort_logits_fn(onnx_path)(ids, mask)
    if got.shape != expected.shape:
        raise RuntimeError(f"ORT logits shape {got.shape} != torch {expected.shape}")
    if name == "zh-tiny-lm":
        keep = mask.astype(bool)
        got, expected = got[keep], expected[keep]
    return float(np.abs(got - expected).max())


def build_key(name: str) -> str:
    ref = get_reference(name)
    load_info(name)  # checks the files exist
    return sha256_text(json.dumps(
        [EXPORT_VERSION, name, sha256_file(ref.weights), sha256_file(ref.info), sha256_file(TOKENIZER_FILE),
         versions()], sort_keys=True))


def build_reference(name: str, out_dir: Path | None = None) -> Path:
    """Export (or reuse) a trained reference model; returns the path of `model.onnx` (see the module docstring)."""
    ref = get_reference(name)
    info = load_info(name)
    key = build_key(name)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir("models", f"{name}-{key[:16]}")
    onnx_path = out_dir / MODEL_FILE
    info_path = out_dir / BUILD_INFO
    if info_path.is_file() and onnx_path.is_file() and (out_dir / DATA_FILE).is_file() \
            and (out_dir / "tokenizer.json").is_file():
        try:
            if json.loads(info_path.read_text()).get("key") == key:
                return onnx_path
        except (OSError, ValueError):
            pass

    import torch


    torch.manual_seed(0)
    model, info = load_torch_model(name)
    vocab_size = info["config"]["vocab_size"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        tmp_onnx = Path(tmp) / MODEL_FILE
        if name == "zh-tiny-lm":
            facts = export_tiny_llama(model, tmp_onnx, vocab_size=vocab_size)
        else:
            facts = _export_classifier(model, tmp_onnx)
        diff = max_abs_diff(name, model, tmp_onnx, vocab_size)
        if not diff < MAX_DIFF:
            raise RuntimeError(f"exported {name} disagrees with torch: max |logits diff| {diff:g}")
        shutil.copyfile(TOKENIZER_FILE, Path(tmp) / "tokenizer.json")
        # data first, graph next, build record last: a folder with a matching record is complete
        for file in (DATA_FILE, "tokenizer.json", MODEL_FILE):
            os.replace(Path(tmp) / file, out_dir / file)
    build = {
        "key": key,
        "name": name,
        "description": ref.description,
        "export_version": EXPORT_VERSION,
        "config": info["config"],
        "weights_sha256": sha256_file(ref.weights),
        "tokenizer_sha256": sha256_file(TOKENIZER_FILE),
        "versions": versions(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "max_abs_diff_vs_torch": diff,
        "metric": info.get("metric"),
        **facts,
        **export_hashes(onnx_path),
    }
    write_json_atomic(info_path, build)
    return onnx_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtc.models.reference", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the qtc cache)")
    args = parser.parse_args(argv)
    try:
        path = build_reference(args.name, args.out)
    except QtcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
