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
