"""Compiling under a memory limit: quantized tensors spilled to a scratch file, the float source not run beside
the compiled model, and the same bytes out as an unlimited compile."""

import numpy as np
import onnx_ir as ir

import qtc
from qtc.util.spill import SpillStore, spill, spilling


def test_spilled_tensors_read_back_the_same_values():
    store = SpillStore(min_bytes=16)
    try:
        array = np.arange(64, dtype=np.float32).reshape(8, 8)
        small = ir.tensor(np.ones(2, np.float32), name="small")
        with spilling(store):
            spilled = spill(ir.tensor(array, name="w"))
            assert spill(small) is small  # under min_bytes: stays in memory
        assert isinstance(spilled, ir.ExternalTensor) and np.array_equal(spilled.numpy(), array)
        assert spill(ir.tensor(array, name="w")).__class__ is not ir.ExternalTensor  # outside the block: unchanged
        assert store.summary() == {"tensors": 1, "bytes": array.nbytes}
    finally:
        store.close()
    assert not store.folder.exists()


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.suffix in (".onnx", ".data")}


def test_a_memory_limited_compile_spills_and_writes_the_same_model(tiny_llama, tmp_path):
    plain = qtc.compile(tiny_llama, recipe="w4a16", quiet=True)
    assert plain.report["memory"]["spilled"] is None
    plain.save(tmp_path / "plain" / "m.onnx")
    limited = qtc.compile(tiny_llama, recipe="w4a16", quiet=True, memory_limit=12 << 20)  # the source is 20 MB
    assert limited.report["memory"]["spilled"]["tensors"] > 0
    check = limited.report["post_compile_check"]
    assert check["source_run_by"] is None and "ran in a child process" in check["skipped_source"]
    assert check["compiled_outputs"]["logits"][-1] == 4096
    limited.save(tmp_path / "limited" / "m.onnx")
    assert _files(tmp_path / "limited" / "m.onnx") == _files(tmp_path / "plain" / "m.onnx")


def test_a_spilled_int8_block_weight_is_packed_and_unmapped(tiny_llama, tmp_path):
    """An int8 block weight (an LM head kept at 8 bits) comes back from the scratch file as a view of its mapping;
    MatMulNBits packing must let go of it before unmapping (it raised BufferError on qwen2.5-coder-1.5b)."""
    from qtc.recipes import parse_recipe

    recipe = parse_recipe({"base": "w4a16", "name": "w4a16-h8", "overrides": [
        {"name": "*lm_head*", "quantize": True,
         "weight": {"dtype": "int8", "granularity": "block", "block_size": 32, "symmetric": True}}]})
    plain = qtc.compile(tiny_llama, recipe=recipe, quiet=True)
    plain.save(tmp_path / "plain" / "m.onnx")
    limited = qtc.compile(tiny_llama, recipe=recipe, quiet=True, memory_limit=12 << 20)
    assert limited.report["memory"]["spilled"]["tensors"] > 0
    assert any(n.op_type == "MatMulNBits" and n.attributes.get_int("bits", 4) == 8 for n in limited.model.graph)
    limited.save(tmp_path / "limited" / "m.onnx")
    assert _files(tmp_path / "limited" / "m.onnx") == _files(tmp_path / "plain" / "m.onnx")


def test_per_pass_peaks_leave_the_process_peak_intact():
    import numpy as np

    from qtc.util.spill import PeakTracker, peak_rss

    before = peak_rss()
    tracker = PeakTracker()
    tracker.step("big", lambda: np.ones(64 << 20, np.uint8).sum())
    tracker.step("small", lambda: None)
    assert [name for name, _ in tracker.steps] == ["big", "small"]
    assert all(0 < peak <= tracker.overall for _, peak in tracker.steps)
    assert peak_rss() >= before and tracker.overall >= before  # resetting per step loses no process peak


def test_spilled_gptq_integers_are_unmapped_once_written(kv_decoder, tmp_path, monkeypatch):
    """GPTQ's chosen integers and scales wait in the scratch file; reading them into the QDQ form must unmap them,
    or every layer's stays resident to the end of the compile (a 7B GPTQ compile's packing passes held 9.2 GB
    where RTN's held 3.7). Spilling every tensor here (min_bytes 16) puts this small model on that path."""
    import functools
    from pathlib import Path

    import qtc.api

    plain = qtc.compile(kv_decoder, recipe="w4a8-gptq", calib="zh-news", samples=2, seq_len=32, quiet=True)
    monkeypatch.setattr(qtc.api, "SpillStore", functools.partial(SpillStore, min_bytes=16))
    limited = qtc.compile(kv_decoder, recipe="w4a8-gptq", calib="zh-news", samples=2, seq_len=32, quiet=True,
                          memory_limit=56 << 20)  # zh-tiny-lm's 20 MB of weights: above a third, so it spills
    assert limited.report["memory"]["spilled"]["tensors"] > 100
    assert {layer.get("used") for layer in limited.report["rounding"]["layers"].values()} >= {"gptq"}
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if "qtc-spill-" in line]
    assert mapped == []
    plain.save(tmp_path / "plain" / "m.onnx")
    limited.save(tmp_path / "limited" / "m.onnx")
    assert _files(tmp_path / "limited" / "m.onnx") == _files(tmp_path / "plain" / "m.onnx")
