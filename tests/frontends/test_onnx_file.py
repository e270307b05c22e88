"""Loading and saving ONNX files: bad files are refused with one clear error; saving is atomic."""

import os

import numpy as np
import onnx_ir as ir
import pytest

from qtc.errors import QtcError
from qtc.frontends.onnx_file import load_model, save_model


def matmul_model(k=16, n=8) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, k]))
    w = ir.Value(name="w", const_value=ir.tensor(np.arange(k * n, dtype=np.float32).reshape(k, n) / 100, name="w"))
    node = ir.node("MatMul", [x, w], name="mm")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_round_trip_with_external_data(tmp_path):
    written = save_model(matmul_model(), tmp_path / "m.onnx", external_data=True)
    assert [p.name for p in written] == ["m.onnx.data", "m.onnx"]
    loaded = load_model(tmp_path / "m.onnx")
    assert isinstance(loaded.graph.initializers["w"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(loaded.graph.initializers["w"].const_value.numpy(), matmul_model().graph.initializers["w"].const_value.numpy())
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]  # no staging folder left behind


def test_truncated_file_is_refused(tmp_path):
    save_model(matmul_model(), tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(QtcError, match="cut.onnx"):
        load_model(tmp_path / "cut.onnx")


def test_text_file_is_not_onnx(tmp_path):
    (tmp_path / "notes.onnx").write_text("人民日报 1998 年 1 月\n")
    with pytest.raises(QtcError, match="notes.onnx"):
        load_model(tmp_path / "notes.onnx")


def test_external_data_escaping_the_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_model(matmul_model(), tmp_path / "outside.onnx", external_data=True)
    model = ir.load(tmp_path / "outside.onnx")
    tensor = model.graph.initializers["w"].const_value
    tensor._location = "../outside.onnx.data"  # what a hostile file would say; ir keeps it verbatim
    ir.save(model, folder / "evil.onnx")
    with pytest.raises(QtcError, match="outside the model's folder"):
        load_model(folder / "evil.onnx")


def test_missing_external_data_is_refused(tmp_path):
    save_model(matmul_model(), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(QtcError, match="external data file missing"):
        load_model(tmp_path / "m.onnx")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(QtcError, match="cannot write .*m.onnx: disk full"):  # the user's to fix: one line, exit 2
        save_model(matmul_model(), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []
