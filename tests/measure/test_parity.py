"""qtc parity: cross-backend agreement that never passes a CPU run off as an accelerator run."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

import qtc
from qtc.backends import BACKENDS
from qtc.backends.cann import cann_options
from qtc.errors import QtcError
from qtc.testing import assert_parity

CUDA_OK, CUDA_WHY = BACKENDS["cuda"].availability()


@pytest.fixture(scope="module")
def builds(tiny_llama, tmp_path_factory):
    """An intact w8a8 build and a broken copy with one DequantizeLinear scale multiplied by 10."""
    folder = tmp_path_factory.mktemp("parity")
    shutil.copyfile(tiny_llama.parent / "tokenizer.json", folder / "tokenizer.json")
    result = qtc.compile(tiny_llama, recipe="w8a8", calib="zh-news", samples=4, seq_len=128, compare=False, quiet=True)
    intact = result.save(folder / "intact.onnx")
    model = ir.load(intact)
    scale = next(v for v in model.graph.initializers.values() if v.name.endswith("q_proj.weight_scale"))
    scale.const_value = ir.tensor(scale.const_value.numpy() * 10, name=scale.name)
    broken = folder / "broken.onnx"
    ir.save(model, broken, external_data="broken.onnx.data")
    return intact, broken


def _parity(*args):
    return subprocess.run([sys.executable, "-m", "qtc.cli.main", "parity", *map(str, args)], capture_output=True, text=True)


def test_intact_build_passes_against_float(builds, tiny_llama):
    result = _parity(builds[0], "--against", tiny_llama, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["recipe_class"] == "int8-activations" and data["against"]["outputs"]["logits"]["cosine"] > 0.99


def test_broken_scale_exits_3(builds, tiny_llama):
    result = _parity(builds[1], "--against", tiny_llama, "--json")
    assert result.returncode == 3, result.stderr
    assert any("logits" in failure for failure in json.loads(result.stdout)["failures"])


def test_unavailable_backends_are_reported_not_substituted(builds):
    result = _parity(builds[0], "--backends", "cpu,cuda,cann", "--json")
    data = json.loads(result.stdout)
    for name in ("cuda", "cann"):
        entry = data["backends"][name]
        if not entry["available"]:
            assert entry["reason"] and "outputs" not in entry  # no CPU numbers under an accelerator's name
    missing = [name for name, entry in data["backends"].items() if not entry["available"]]
    assert result.returncode == (4 if missing else 0)  # a CI gate must not pass where the accelerator never ran
    if missing:
        assert _parity(builds[0], "--backends", "cpu,cann", "--allow-unavailable").returncode == 0
    assert data["backends"]["cann"]["provider_options"]["precision_mode"] == "must_keep_origin_dtype"


def test_assert_parity_for_users(builds, tiny_llama):
    assert_parity(builds[0], against=tiny_llama)
    with pytest.raises(AssertionError, match="cosine"):
        assert_parity(builds[1], against=tiny_llama)
    if not CUDA_OK:  # a required backend that cannot run is a failure, not a silent CPU pass
        with pytest.raises(AssertionError, match="cuda unavailable"):
            assert_parity(builds[0], backends=("cpu", "cuda"), require=("cuda",))


def test_cann_options_are_validated():
    assert cann_options()["enable_cann_graph"] == "1"
    with pytest.raises(QtcError, match="unknown CANN provider option 'fast_mode'"):
        cann_options({"fast_mode": "1"})
    with pytest.raises(QtcError, match="precision_mode"):
        cann_options({"precision_mode": "turbo"})


def test_compile_for_unknown_target_is_refused(tiny_llama):
    with pytest.raises(QtcError, match="unknown backend 'npu'"):
        qtc.compile(tiny_llama, recipe="w8a16", target="npu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_OK, reason=f"CUDA EP unavailable: {CUDA_WHY}")
def test_cpu_vs_cuda_parity(builds):
    data = json.loads(_parity(builds[0], "--backends", "cpu,cuda", "--json").stdout)
    assert data["backends"]["cuda"]["available"] and data["passed"], data["failures"]
    assert np.isfinite(data["backends"]["cuda"]["outputs"]["logits"]["cosine"])


def test_feed_errors_are_one_line(builds):
    for bad, message in (("nosuch=1", "has no input 'nosuch'"), ("budget=x", "NAME=NUMBER")):
        result = _parity(builds[0], "--feed", bad)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
