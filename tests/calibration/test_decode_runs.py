"""A decoder's calibration runs: prefills one by one, then the decode steps of a group of windows as one batch."""

import numpy as np

from qtc.calibration.data import decode_steps, model_inputs, text_feed, window_runs
from qtc.frontends.onnx_file import load_model
from qtc.measure.generate import Decoder


def test_decode_steps_of_several_windows_run_as_one_batch_with_each_windows_values(kv_decoder):
    inputs = model_inputs(load_model(kv_decoder))
    decoder = Decoder(kv_decoder)
    windows = [text_feed(np.arange(start, start + 20, dtype=np.int64), inputs) for start in (10, 200, 900)]
    windows.append(text_feed(np.arange(40, 52, dtype=np.int64), inputs))  # another length: a group of its own
    runs = list(window_runs(windows, inputs, decoder._run, batch=8))
    assert [kind for _, _, kind, _ in runs] == ["prefill"] * 3 + ["first step"] + ["step"] * 3 + \
        ["prefill", "first step"] + ["step"] * 3
    assert [done for *_, done in runs] == [0] * 6 + [3] + [0] * 4 + [1]  # progress: windows finished per run
    assert [feed["input_ids"].shape for feed, *_ in runs[3:7]] == [(3, 1)] * 4
    assert [feed["past_key_values.0.key"].shape[2] for feed, *_ in runs[3:7]] == [16, 17, 18, 19]
    for number, window in enumerate(windows[:3]):
        alone = [outputs["logits"][0] for _, outputs in decode_steps(window, inputs, decoder._run)]
        batched = [runs[number][1]["logits"][0]] + [outputs["logits"][number] for _, outputs, *_ in runs[3:7]]
        for one, together in zip(alone, batched, strict=True):
            np.testing.assert_allclose(together, one, rtol=1e-4, atol=1e-4)
    assert len(list(window_runs(windows, inputs, decoder._run, batch=2))) == (2 + 4) + (1 + 4) + (1 + 4)
