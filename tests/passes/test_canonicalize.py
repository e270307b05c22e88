"""Old opsets and their attribute forms: converted so ONNX Runtime takes them, or refused in one line."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qtc
from qtc.errors import QtcError

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
ATTRIBUTE_FORMS = [
    "pytorch-operator/test_operator_pad",  # Pad: pads attribute (opset 6)
    "pytorch-operator/test_operator_reduced_mean",  # ReduceMean: axes attribute
    "pytorch-operator/test_operator_clip",  # Clip: min / max attributes
    "pytorch-converted/test_GLU",  # Split: split attribute
    "pytorch-operator/test_operator_addmm",  # Gemm: broadcast attribute
    "pytorch-converted/test_BatchNorm2d_eval",  # BatchNormalization: is_test / spatial
    "pytorch-operator/test_operator_chunk",  # Split into chunks
    "simple/test_sequence_model1",  # seq(tensor) values keep their type
    "simple/test_sequence_model8",  # SplitToSequence
]


def _feeds(folder: Path) -> dict[str, np.ndarray]:
    """The test's own recorded inputs, named as the model names them."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    files = sorted((folder / "test_data_set_0").glob("input_*.pb"))
    return {name: numpy_helper.to_array(onnx.load_tensor(str(f))) for name, f in zip(names, files)}


@pytest.mark.parametrize("name", ATTRIBUTE_FORMS)
def test_old_attribute_forms_compile_and_run_on_the_sources_inputs(name, tmp_path):
    folder = DATA / name
    result = qtc.compile(folder / "model.onnx", recipe="w8a16", quiet=True)
    out = result.save(tmp_path / "out.onnx")
    assert onnx.load(str(out)).opset_import[0].version >= 21
    feeds = _feeds(folder)
    # the recorded outputs: several of these opset-6 sources do not even load in ONNX Runtime 1.3x any more
    expected = [numpy_helper.to_array(onnx.load_tensor(str(f))) for f in sorted((folder / "test_data_set_0").glob("output_*.pb"))]
    got = ort.InferenceSession(str(out)).run(None, feeds)
    for want, have in zip(expected, got):
        np.testing.assert_allclose(np.asarray(have, dtype=np.float64), np.asarray(want, dtype=np.float64), rtol=0.05, atol=0.05)


def test_training_ops_are_refused_by_name():
    with pytest.raises(QtcError, match="training operators .*Gradient"):
        qtc.compile(DATA / "simple" / "test_gradient_of_add" / "model.onnx", recipe="w8a16", quiet=True)


def test_a_calibrated_compile_of_a_source_onnx_runtime_cannot_run_skips_only_the_held_out_comparison(tmp_path):
    """Calibration runs the opset-21 graph; the held-out comparison would open the opset-6 source in ONNX Runtime,
    which no longer implements BatchNormalization-6: it is skipped and says why (it was an internal error)."""
    folder = DATA / "pytorch-converted" / "test_BatchNorm2d_eval"
    feeds = _feeds(folder)
    for i in range(20):  # 10 % held out: two windows
        np.savez(tmp_path / f"{i:02d}.npz", **feeds)
    result = qtc.compile(folder / "model.onnx", recipe="w8a8", calib=tmp_path, quiet=True)
    assert result.report["post_compile_check"]["source_run_by"].startswith("onnx.reference")
    assert "ONNX Runtime does not run the source" in result.report["heldout_comparison"]["skipped"]
