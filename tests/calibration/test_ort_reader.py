"""The CalibrationDataReader that hands qtc's calibration windows to ORT's own quantizers."""

import copy

import numpy as np

from qtc.calibration.data import load_calibration, model_inputs
from qtc.calibration.ort_reader import CalibrationReader
from qtc.frontends.onnx_file import load_model


def _windows(reader) -> list[dict]:
    return list(iter(reader.get_next, None))


def test_reader_limit_survives_the_deep_copy_ort_gptq_makes(tiny_llama, chinese_corpus):
    calib = load_calibration(chinese_corpus, tokenizer=tiny_llama.parent / "tokenizer.json", n_samples=6, seq_len=32, seed=0)
    inputs = model_inputs(load_model(tiny_llama))
    everything = _windows(CalibrationReader(calib, inputs))
    limited = CalibrationReader(calib, inputs, limit=2)
    copied = copy.deepcopy(limited)  # ORT's GPTQ path iterates a deep copy, so the copy must keep the limit
    assert len(everything) == 6
    for reader in (limited, copied):
        first = _windows(reader)
        assert len(first) == 2
        for got, want in zip(first, everything[:2]):
            assert got.keys() == want.keys()
            assert all(np.array_equal(got[k], want[k]) for k in got)
    limited.rewind()
    assert len(_windows(limited)) == 2
