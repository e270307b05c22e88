"""Sessions a compile shares, and the one it opens on a thread while its passes run."""

import onnxruntime as ort
import pytest

from qtc.backends import get_backend
from qtc.backends.base import sharing_sessions


def test_a_session_opened_ahead_is_the_one_shared_and_finished_when_sharing_ends(kv_decoder):
    backend = get_backend("cpu")
    with sharing_sessions():
        future = backend.open_ahead(kv_decoder)
        backend.adopt_session(kv_decoder, future)
        session = backend.session(kv_decoder)
        assert session is future.result() and backend.session(kv_decoder) is session
        assert [i.name for i in session.get_inputs()][0] == "input_ids"
        pending = backend.open_ahead(kv_decoder)
        backend.adopt_session(str(kv_decoder) + "-not-asked-for", pending)
    assert pending.done()  # no opening outlives the sharing
    assert backend.session(kv_decoder) is not session  # outside it, each call opens its own


def test_an_opening_ahead_that_fails_raises_where_the_session_is_asked_for():
    backend = get_backend("cpu")
    broken = b"not an onnx model"
    with pytest.raises(Exception) as direct:
        backend.session(broken)
    with sharing_sessions():
        backend.adopt_session(broken, backend.open_ahead(broken))
        for _ in range(2):  # each time it is asked for, as opening it there would
            with pytest.raises(type(direct.value)):
                backend.session(broken)


def test_adopting_outside_sharing_keeps_nothing(kv_decoder):
    backend = get_backend("cpu")
    future = backend.open_ahead(kv_decoder)
    backend.adopt_session(kv_decoder, future)
    assert isinstance(future.result(), ort.InferenceSession)
    assert backend.session(kv_decoder) is not future.result()
