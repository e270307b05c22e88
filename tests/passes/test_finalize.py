"""The finishing passes: provenance written sorted into metadata_props (same bytes whatever the dict order), and
the IR version lowered to what the installed onnxruntime loads."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qtc.backends.base import max_ir_version
from qtc.passes.finalize import LimitIrVersionPass, RecordProvenancePass
from tests import graphs


def test_provenance_keys_are_written_sorted():
    model = graphs.mlp()
    result = RecordProvenancePass({"qtc.version": "1", "qtc.calibration.seed": "0", "qtc.recipe": "{}"})(model)
    assert result.modified
    proto = onnx.load_from_string(ir.to_proto(model).SerializeToString())
    assert [(p.key, p.value) for p in proto.metadata_props] == [
        ("qtc.calibration.seed", "0"), ("qtc.recipe", "{}"), ("qtc.version", "1")]


def test_provenance_bytes_do_not_depend_on_the_dict_order():
    props = {f"qtc.key{i}": str(i) for i in (3, 1, 2)}
    first, second = graphs.mlp(), graphs.mlp()
    RecordProvenancePass(props)(first)
    RecordProvenancePass(dict(reversed(props.items())))(second)
    assert ir.to_proto(first).SerializeToString() == ir.to_proto(second).SerializeToString()


def test_provenance_overwrites_a_key_the_model_already_has():
    model = graphs.mlp()
    model.metadata_props["qtc.recipe"] = "old"
    model.metadata_props["author"] = "someone"
    RecordProvenancePass({"qtc.recipe": "new"})(model)
    assert dict(model.metadata_props) == {"qtc.recipe": "new", "author": "someone"}


def test_no_provenance_changes_nothing():
    model = graphs.mlp()
    assert not RecordProvenancePass({})(model).modified and not model.metadata_props


def test_ir_version_is_lowered_to_what_the_runtime_loads():
    newest = max_ir_version()
    model = graphs.mlp()
    model.ir_version = newest + 1
    feed = graphs.random_feed(model)
    with pytest.raises(Exception, match="IR version"):
        graphs.session(model)  # the runtime refuses it ...
    result = LimitIrVersionPass(newest)(model)
    assert result.modified and model.ir_version == newest
    assert graphs.run(model, feed)[0].shape == (2, 8, 16)  # ... and loads it once lowered


@pytest.mark.parametrize("version", [8, 10])
def test_an_older_ir_version_is_never_raised(version):
    model = graphs.mlp()
    model.ir_version = version
    assert not LimitIrVersionPass(10)(model).modified and model.ir_version == version
    assert np.isfinite(graphs.run(model, graphs.random_feed(model))[0]).all()
