"""Shared fixtures: the real reference model (a dynamo-exported Llama-style decoder) and real Chinese text."""

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    """4 layers, hidden 256, GQA, external data, its zh-news BPE tokenizer beside it (cached across runs)."""
    from qtc.models.tiny_llama import build_tiny_llama

    return build_tiny_llama()


@pytest.fixture(scope="session")
def chinese_corpus(tmp_path_factory) -> Path:
    """A plain-text corpus file: the first 600 People's Daily paragraphs of the zh-news calibration split."""
    from qtc.calibration.workloads import get_workload

    path = tmp_path_factory.mktemp("corpus") / "renmin-1998.txt"
    path.write_text("\n".join(get_workload("zh-news").texts("calib")[:600]) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def case(tiny_llama, chinese_corpus, tmp_path):
    """A writable copy of the model folder, and where an output would go (the CLI's bad-input tests)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        shutil.copyfile(tiny_llama.parent / name, folder / name)
    return {"model": folder / "model.onnx", "corpus": chinese_corpus, "out": tmp_path / "out" / "x.onnx", "tmp": tmp_path}


@pytest.fixture(scope="session")
def kv_decoder() -> Path:
    """zh-tiny-lm as a KV-cache decoder folder (onnxruntime-genai layout), built from the committed weights."""
    from qtc.models.decoders import build_kv_decoder

    return build_kv_decoder("zh-tiny-lm")


@pytest.fixture(scope="session")
def tiny_llama_reference() -> Path:
    """zh-tiny-lm exported cache-less by the torch dynamo exporter (the trained weights, not tiny_llama's random ones)."""
    from qtc.models.reference import build_reference

    return build_reference("zh-tiny-lm")
