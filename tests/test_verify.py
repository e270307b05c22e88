"""`qtc verify`: a model compiled in another process, from another working directory, rebuilds to the same bytes;
one changed scale is found by name."""

import json
import subprocess
import sys

import onnx
from onnx import numpy_helper

from tests.cli.test_main import assert_bad_input


def qtc_in(cwd, *args):
    return subprocess.run([sys.executable, "-m", "qtc.cli.main", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_verify_rebuilds_identical_bytes_and_names_a_changed_scale(kv_decoder, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    out = tmp_path / "out" / "model.onnx"
    built = qtc_in(tmp_path / "a", "compile", kv_decoder, "--recipe", "w8a8", "--calib", "zh-news", "--samples", "4",
                   "--seq-len", "32", "-o", out, "--json")
    assert built.returncode == 0, built.stderr
    same = qtc_in(tmp_path / "b", "verify", out, "--source", kv_decoder)
    assert same.returncode == 0 and "identical" in same.stdout, same.stdout + same.stderr

    model = onnx.load(str(out))
    scale = next(t for t in model.graph.initializer if t.name.endswith("_scale") and t.dims)
    changed = numpy_helper.to_array(scale).copy()
    changed.flat[0] *= 1.5
    scale.CopyFrom(numpy_helper.from_array(changed, scale.name))
    onnx.save(model, str(out), save_as_external_data=True, location="model.onnx.data")
    different = qtc_in(tmp_path / "b", "verify", out, "--source", kv_decoder, "--json")
    assert different.returncode == 3, different.stderr
    rows = json.loads(different.stdout)["differences"]
    assert [row["tensor"] for row in rows] == [scale.name] and f"1 of {changed.size} values" in rows[0]["difference"]


def test_verify_refuses_what_it_cannot_rebuild(kv_decoder, tmp_path):
    assert_bad_input(qtc_in(tmp_path, "verify", kv_decoder), "carries no qtc provenance")
    assert_bad_input(qtc_in(tmp_path, "verify", tmp_path / "none.onnx"), "model not found")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert_bad_input(qtc_in(tmp_path, "verify", tmp_path / "bad.onnx"), "is not an ONNX model")


def test_verify_refuses_a_different_source(kv_decoder, tiny_llama, tmp_path):
    out = tmp_path / "out" / "model.onnx"
    assert qtc_in(tmp_path, "compile", kv_decoder, "--recipe", "w8a16", "-o", out).returncode == 0
    assert_bad_input(qtc_in(tmp_path, "verify", out, "--source", tiny_llama), "is not the source model")
