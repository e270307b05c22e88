"""Export a pretrained transformers model (a Hugging Face folder or a .gguf file) to ONNX, offline.

`export_hf(source, out)` loads the model with transformers (never from a hub: `HF_HUB_OFFLINE=1`,
`local_files_only`), in eval mode, float32, eager attention, no KV cache, exports it with
`torch.onnx.export(..., dynamo=True)` and writes into the folder `out`:

- `model.onnx` + `model.onnx.data` (external data), opset as the exporter chooses (recorded);
- `tokenizer.json`: the model's own fast tokenizer (the folder's file, or the one transformers builds from the
  GGUF metadata);
- `qtc_export.json`, written last (a folder with it is complete): source and the sha256 of its files, the task,
  versions, parameter count, opset, graph facts and the max |ONNX - torch| difference on a short Chinese input
  run with ONNX Runtime CPU.

Graph contracts (inputs int64 [batch, seq], both dims dynamic):
- `causal-lm`: `input_ids`, `attention_mask` -> `logits` float32 [batch, seq, vocab].
- `sentence-embedding`: `input_ids`, `attention_mask`, `token_type_ids` -> `sentence_embedding` float32
  [batch, hidden], the mean of the encoder's last hidden state over the positions where attention_mask == 1
  (sentence-transformers' mean pooling; not L2-normalised).

Initializers keep the torch parameter names (`model.layers.0.self_attn.q_proj.weight`, `encoder.layer.0...`).
A Linear weight used only by its MatMul is stored transposed, [in, out], with its `Transpose` folded (see
`qtc.models.tiny_llama`); a tied embedding / LM head stays one initializer that feeds both the `Gather` and a
`Transpose -> MatMul` (folding it would store a second copy of the largest tensor).

The same source and versions give byte-identical `model.onnx`, `model.onnx.data` and `tokenizer.json`.

A GGUF is loaded once with its weights dequantized to float32 and saved as a plain HF folder under
`cache_dir("hf", <gguf sha256[:16]>)` (weights, config, tokenizer); every export then loads that copy, which is
fast and makes the first export and later ones identical.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime
import onnxruntime as ort
from tokenizers import Tokenizer

from qtc.errors import QtcError
from qtc.frontends.onnx_file import save_model
from qtc.frontends.torch_export import (
    exporter_versions,
    fold_weight_transposes,
    normalize_metadata,
    optimize_exported,
    quiet,
)
from qtc.util.cache import cache_dir, sha256_file, sha256_text
from qtc.util.files import write_json_atomic

# Bump when anything that changes the exported bytes changes (wrappers, graph passes, example inputs, ...).
EXPORT_VERSION = "qtc-hf-1"
# Bump when the dequantized HF copy of a GGUF changes layout.
GGUF_COPY_VERSION = "qtc-gguf-copy-1"

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "qtc_export.json"
_COPY_RECORD = "qtc_gguf_copy.json"

Task = Literal["causal-lm", "sentence-embedding"]
TASKS: tuple[str, ...] = ("causal-lm", "sentence-embedding")

INPUTS = {
    "causal-lm": ("input_ids", "attention_mask"),
    "sentence-embedding": ("input_ids", "attention_mask", "token_type_ids"),
}
OUTPUTS = {"causal-lm": ("logits",), "sentence-embedding": ("sentence_embedding",)}

# Short Chinese check input: two texts of different length, so padding and the mask are exercised too.
VERIFY_TEXTS = ("今天北京天气晴朗。", "人民日报记者报道：新年伊始，全国各地经济形势稳中向好。")

# Encoder families exported as sentence-embedding models when no task is given.
_ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta", "deberta-v2", "albert",
    "camembert", "ernie", "nomic_bert", "modernbert",
}

_HF_LOGGERS = ("transformers", "accelerate", "huggingface_hub")


# ------------------------------------------------------------------------------------------------ helpers


def require_torch_stack(what: str = "qtc export") -> None:
    """QtcError naming the install command when torch / transformers are missing."""
    missing = [m for m in ("torch", "transformers", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise QtcError(f"{what} needs {', '.join(missing)}: pip install 'qtc[torch]'")


def _gguf_needs() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise QtcError(f"loading a .gguf needs the {' and '.join(missing)} package(s): pip install gguf (in the qtc[gemma] and qtc[qwen] extras)")


def versions() -> dict[str, str]:
    """Versions of everything that shapes the exported bytes."""
    return exporter_versions()


def source_files(source: Path) -> dict[str, str]:
    """sha256 of the source: the .gguf file, or every regular file of the HF folder (relative path -> sha256)."""
    source = Path(source)
    if source.is_file():
        return {source.name: sha256_file(source)}
    files = {}
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in Path(rel).parts):
            files[rel] = sha256_file(path)
    return files


def source_digest(files: dict[str, str]) -> str:
    """One sha256 for a source: of the sorted (path, sha256) list."""
    return sha256_text(json.dumps(sorted(files.items())))


@contextlib.contextmanager
def _quiet_hf():
    """No progress bars, warnings or info lines from transformers while loading; HF hub strictly offline."""
    import transformers

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    loggers = [logging.getLogger(n) for n in _HF_LOGGERS]
    levels = [lg.level for lg in loggers]
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    tqdm_env = os.environ.get("TQDM_DISABLE")
    try:
        os.environ["TQDM_DISABLE"] = "1"  # the GGUF reader's own tqdm bar ignores transformers' switch
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def detect_task(model_dir: Path) -> str:
    """`causal-lm` for *ForCausalLM architectures, `sentence-embedding` for BERT-like encoders."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QtcError(f"{model_dir}: unreadable config.json ({exc})") from None
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal-lm"
    if config.get("model_type") in _ENCODER_TYPES or (Path(model_dir) / "sentence_bert_config.json").is_file():
        return "sentence-embedding"
    raise QtcError(
        f"{model_dir}: cannot tell the task of model_type {config.get('model_type')!r} "
        f"(architectures {architectures}); pass --task causal-lm or --task sentence-embedding"
    )


# ------------------------------------------------------------------------------------------------ GGUF copy


def _check_dense(model) -> None:
    """Refuse to save a GGUF-loaded model in which any weight stayed packed (quantized blocks)."""
    import torch

    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    odd = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    odd += [n for n, b in model.named_buffers() if b.is_floating_point() and b.dtype != torch.float32]
    if packed or odd:
        raise RuntimeError(f"GGUF weights not fully dequantized: modules {packed[:3]}, tensors {odd[:3]}")


def gguf_to_hf(gguf: Path, *, gguf_sha256: str | None = None) -> Path:
    """The dequantized float32 HF copy of `gguf` (weights, config, tokenizer), made once and cached.

    Lives in `cache_dir("hf", <sha256[:16]>)`; valid when its `qtc_gguf_copy.json` names the same sha256 and
    transformers version (the GGUF dequantization is transformers' code). Before saving, every parameter and
    buffer is checked to be a plain float32 tensor (no weight left in packed GGUF blocks).
    """
    gguf = Path(gguf)
    sha = gguf_sha256 or sha256_file(gguf)
    folder = cache_dir("hf", sha[:16])
    record_path = folder / _COPY_RECORD
    try:
        record = json.loads(record_path.read_text())
        if (record.get("gguf_sha256") == sha and record.get("version") == GGUF_COPY_VERSION
                and record.get("transformers") == versions()["transformers"]):  # its dequantizer made it
            return folder
    except (OSError, ValueError):
        pass

    _gguf_needs()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    record_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with _quiet_hf(), torch.no_grad():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True,
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        except (ValueError, KeyError, OSError) as exc:
            raise QtcError(f"{gguf.name}: transformers cannot load it ({str(exc).splitlines()[0]})") from None
        _check_dense(model)
        # transformers refuses save_pretrained on any GGUF-loaded model ("quantized with gguf and is not
        # serializable"), even dequantized. Every weight was just checked to be plain float32, so drop the
        # quantizer and its config: what is saved is an ordinary float model.
        model.hf_quantizer = None
        for cfg in (model.config, getattr(model.config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
        model.config.name_or_path = ""
        with tempfile.TemporaryDirectory(dir=folder, prefix=".copy-") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if not (Path(tmp) / TOKENIZER_FILE).is_file():
                tokenizer.backend_tokenizer.save(str(Path(tmp) / TOKENIZER_FILE))
            for path in sorted(Path(tmp).iterdir()):
                path.chmod(0o644)
                os.replace(path, folder / path.name)
    del model
    record = {
        "version": GGUF_COPY_VERSION,
        "gguf": gguf.name,
        "gguf_sha256": sha,
        "transformers": versions()["transformers"],
        "load_and_save_s": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(record_path, record)
    return folder


# ------------------------------------------------------------------------------------------------ loading


def _load(model_dir: Path, task: str):
    """The torch model (eval, float32, eager attention, no cache)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    with _quiet_hf():
        try:
            model = cls.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager",
                                        local_files_only=True)
        except (ValueError, KeyError, OSError) as exc:
            raise QtcError(f"{model_dir}: transformers cannot load it as {task} ({str(exc).splitlines()[0]})") from None
    model.eval()
    model.float()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def _tokenizer_file(model_dir: Path, tmp: Path) -> Path:
    """The folder's tokenizer.json, or one saved from transformers' fast tokenizer for the folder."""
    path = Path(model_dir) / TOKENIZER_FILE
    if path.is_file():
        return path
    from transformers import AutoTokenizer

    with _quiet_hf():
        try:
            tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (ValueError, KeyError, OSError) as exc:
            raise QtcError(f"{model_dir}: no tokenizer.json and no loadable tokenizer ({exc})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise QtcError(f"{model_dir}: no tokenizer.json and its tokenizer is not a fast (tokenizers) one")
    out = tmp / TOKENIZER_FILE
    backend.save(str(out))
    return out


# ------------------------------------------------------------------------------------------------ wrappers


def _make_wrapper(task: str):
    """nn.Module classes taking the graph inputs positionally. They hold the HF model's children under the
    same names (so initializers are named like the HF state dict) and call the HF model's own forward."""
    import torch

    class _Borrowing(torch.nn.Module):
        def __init__(self, hf_model):
            super().__init__()
            if list(hf_model.named_parameters(recurse=False)) or list(hf_model.named_buffers(recurse=False)):
                raise QtcError(f"{type(hf_model).__name__}: tensors outside submodules are not supported")
            for name, child in hf_model.named_children():
                self.add_module(name, child)
            object.__setattr__(self, "hf_model", hf_model)  # not a submodule: no extra name prefix

    class CausalLMLogits(_Borrowing):
        def forward(self, input_ids, attention_mask):
            return self.hf_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    class MeanPooledEmbedding(_Borrowing):
        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.hf_model(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    cls = CausalLMLogits if task == "causal-lm" else MeanPooledEmbedding
    # The class path lands in node metadata; pin it so the bytes do not depend on how qtc was imported.
    cls.__module__ = "qtc.frontends.hf"
    cls.__qualname__ = cls.__name__
    return cls


def _example_inputs(task: str, vocab_size: int):
    import torch

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(4, max(5, min(vocab_size, 30000)), (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    if task == "causal-lm":
        return ids, mask
    return ids, mask, torch.zeros_like(ids)


# ------------------------------------------------------------------------------------------------ export


def _export(wrapper, task: str, vocab_size: int, max_positions: int | None, path: Path) -> dict:
    """Dynamo export + the tiny_llama normalisation (transposes folded, optimized, metadata stripped)."""
    import torch


    inputs = _example_inputs(task, vocab_size)
    names = INPUTS[task]
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=max_positions) if max_positions else torch.export.Dim("seq")
    dynamic = {name: {0: batch, 1: seq} for name in names}
    t0 = time.perf_counter()
    with quiet(), torch.no_grad():
        program = torch.onnx.export(
            wrapper, inputs, input_names=list(names), output_names=list(OUTPUTS[task]),
            dynamic_shapes=dynamic, dynamo=True, optimize=False, verbose=False,
        )
        model = program.model
        del program
        param_names = {name for name, _ in wrapper.named_parameters()}
        folded = fold_weight_transposes(model, param_names)
        optimize_exported(model)
    normalize_metadata(model)
    graph = model.graph
    got = ([v.name for v in graph.inputs], [v.name for v in graph.outputs])
    if got != (list(names), list(OUTPUTS[task])):
        raise RuntimeError(f"unexpected graph signature: {got[0]} -> {got[1]}")
    facts = {"export_s": round(time.perf_counter() - t0, 1), "opset": model.opset_imports.get(""),
             "folded_weight_transposes": folded, **graph_facts(model)}
    save_model(model, path, external_data=True)
    return facts


def graph_facts(model) -> dict:
    """Counts a quantizer cares about: MatMuls with an initializer weight, transposed weights, op histogram."""
    graph = model.graph
    inits = graph.initializers
    ops: dict[str, int] = {}
    matmul_const_b = 0
    matmul_transposed_init = []
    for node in graph:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type != "MatMul":
            continue
        b = node.inputs[1]
        if b is not None and b.name in inits:
            matmul_const_b += 1
        elif b is not None and b.producer() is not None and b.producer().op_type == "Transpose":
            src = b.producer().inputs[0]
            if src is not None and src.name in inits:
                matmul_transposed_init.append(src.name)
    return {
        "nodes": len(graph),
        "initializers": len(inits),
        "initializer_elements": sum(v.const_value.size for v in inits.values() if v.const_value is not None),
        "matmul_with_initializer_weight": matmul_const_b,
        "matmul_with_transposed_initializer": sorted(matmul_transposed_init),
        "ops": dict(sorted(ops.items())),
    }


def _verify_inputs(task: str, tokenizer_path: Path, bos_id: int | None):
    """Token ids of VERIFY_TEXTS (right-padded batch) from the exported tokenizer.json."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()  # some tokenizer.json files pad to a fixed length (MiniLM: 128); pad here, to the longest
    encodings = [tok.encode(text) for text in VERIFY_TEXTS]
    rows = []
    for enc in encodings:
        ids = list(enc.ids)
        if task == "causal-lm" and bos_id is not None and (not ids or ids[0] != bos_id):
            ids = [bos_id] + ids
        rows.append((ids, list(enc.type_ids) if task != "causal-lm" else None))
    width = max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, (row, type_ids) in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        if type_ids:
            types[i, : len(type_ids)] = type_ids[: len(row)]
    feeds = {"input_ids": ids, "attention_mask": mask}
    if task == "sentence-embedding":
        feeds["token_type_ids"] = types
    return feeds


def verify(wrapper, task: str, onnx_path: Path, feeds: dict) -> dict:
    """Max |ONNX Runtime CPU - torch| on `feeds` (causal LM: positions where attention_mask == 1)."""
    import torch

    with torch.no_grad():
        expected = wrapper(*[torch.from_numpy(feeds[n]) for n in INPUTS[task]]).numpy()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(list(OUTPUTS[task]), feeds)
    del sess
    if got.shape != expected.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} != torch {expected.shape}")
    if task == "causal-lm":
        keep = feeds["attention_mask"].astype(bool)
        got, expected = got[keep], expected[keep]
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    return {
        "max_abs_diff_vs_torch": float(diff.max()),
        "max_abs_torch_output": float(np.abs(expected).max()),
        "verify_texts": list(VERIFY_TEXTS),
        "verify_tokens": int(feeds["attention_mask"].sum()),
        "verify_shape": list(feeds["input_ids"].shape),
    }


def export_hf(model_dir_or_gguf: Path, out: Path, *, task: Task | None = None,
              source_sha256: dict[str, str] | None = None, tolerance: float | None = None,
              extra_info: dict | None = None) -> Path:
    """Export a HF folder (with config.json) or a .gguf file to `out/model.onnx`; returns that path.

    `task` defaults to what config.json says (a .gguf is a causal LM). `source_sha256` may pass the source's
    file hashes when the caller already has them. Raises when ONNX and torch disagree by more than
    `tolerance` (default 1e-3 relative to the largest output magnitude, at least 1e-4). `extra_info` is
    merged into qtc_export.json.
    """
    require_torch_stack()
    src = Path(model_dir_or_gguf).expanduser()
    out = Path(out)
    if task is not None and task not in TASKS:
        raise QtcError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    if src.is_file():
        if not _is_gguf(src):
            raise QtcError(f"{src}: not a GGUF file (expected a .gguf or a Hugging Face model folder)")
        if task not in (None, "causal-lm"):
            raise QtcError(f"{src.name}: a GGUF is exported as causal-lm, not {task}")
        kind = "gguf"
    elif src.is_dir():
        if not (src / "config.json").is_file():
            raise QtcError(f"{src}: not a Hugging Face model folder (no config.json)")
        kind = "hf-dir"
    else:
        raise QtcError(f"export source not found: {src}")


    t_start = time.perf_counter()
    files = source_sha256 or source_files(src)
    if kind == "gguf":
        model_dir = gguf_to_hf(src, gguf_sha256=files[src.name])
        task = "causal-lm"
    else:
        model_dir = src
        task = task or detect_task(src)

    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)  # the folder is incomplete until the record is rewritten
    t_load = time.perf_counter()
    hf_model = _load(model_dir, task)
    load_s = time.perf_counter() - t_load
    config = hf_model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = int(text_config.vocab_size)
    max_positions = getattr(text_config, "max_position_embeddings", None) if task == "sentence-embedding" else None
    n_params = sum(p.numel() for p in hf_model.parameters())
    wrapper = _make_wrapper(task)(hf_model).eval()
    bos_id = getattr(text_config, "bos_token_id", None)

    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        tmp = Path(tmp)
        tokenizer = _tokenizer_file(model_dir, tmp)
        facts = _export(wrapper, task, vocab_size, max_positions, tmp / MODEL_FILE)
        feeds = _verify_inputs(task, tokenizer, bos_id)
        checked = verify(wrapper, task, tmp / MODEL_FILE, feeds)
        limit = tolerance if tolerance is not None else max(1e-4, 1e-3 * checked["max_abs_torch_output"])
        if not checked["max_abs_diff_vs_torch"] <= limit:
            raise RuntimeError(f"exported model disagrees with torch: max |diff| {checked['max_abs_diff_vs_torch']:g} > {limit:g}")
        if tokenizer.parent != tmp:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        # data first, the graph next, the record last: a folder with the record is complete
        for name in (DATA_FILE, TOKENIZER_FILE, MODEL_FILE):
            os.replace(tmp / name, out / name)
    del wrapper, hf_model

    info = {
        "export_version": EXPORT_VERSION,
        "source": {"kind": kind, "path": str(src.resolve()), "files_sha256": files,
                   "sha256": source_digest(files),
                   **({"dequantized_copy": str(model_dir)} if kind == "gguf" else {})},
        "task": task,
        "inputs": list(INPUTS[task]),
        "outputs": list(OUTPUTS[task]),
        "model_type": getattr(config, "model_type", None),
        "architectures": getattr(config, "architectures", None),
        "vocab_size": vocab_size,
        "n_params": n_params,
        "param_bytes_fp32": 4 * n_params,
        "versions": versions(),
        "onnxruntime": _ort_version(),
        **facts,
        **checked,
        "load_s": round(load_s, 1),
        "total_s": round(time.perf_counter() - t_start, 1),
        "files": {name: {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
                  for name in (MODEL_FILE, DATA_FILE, TOKENIZER_FILE)},
    }
    info.update(extra_info or {})
    if task == "sentence-embedding":
        info["pooling"] = "mean over attention_mask (not normalised)"
        info["embedding_dim"] = int(getattr(text_config, "hidden_size", 0))
    write_json_atomic(out / INFO_FILE, info)
    return out / MODEL_FILE


def _ort_version() -> str:
    return onnxruntime.__version__


def read_export_info(folder: Path) -> dict | None:
    """The folder's qtc_export.json when the export there is complete (files present with recorded sizes)."""
    folder = Path(folder)
    try:
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        for name, meta in info["files"].items():
            if (folder / name).stat().st_size != meta["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return info
