"""The CLI contract: bad input gets one line on stderr, exit code 2, and no output file."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml


def qtc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qtc.cli.main", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def assert_bad_input(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_recipes_listing_and_show():
    listing = qtc("recipes")
    assert listing.returncode == 0 and "w8a8" in listing.stdout and "w8a16" in listing.stdout
    shown = yaml.safe_load(qtc("recipes", "show", "w8a8").stdout)
    assert shown["weight"] == {"dtype": "int8", "granularity": "channel", "symmetric": True, "algorithm": "rtn"}
    assert shown["keep_float"] == ["embedding", "lm_head"]


def test_compile_and_inspect_json(tiny_llama, chinese_corpus, tmp_path):
    out = tmp_path / "m.w8a8.onnx"
    result = qtc("compile", tiny_llama, "--recipe", "w8a8", "--calib", chinese_corpus, "--samples", "4",
                 "--seq-len", "64", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["calibration"]["samples"] == 4 and out.is_file()
    info = json.loads(qtc("inspect", out, "--json").stdout)
    assert 0.5 < info["weights_quantized"]["fraction"] < 1.0  # embedding and LM head stay float
    assert info["repeated_blocks"][0]["count"] == 4
    assert info["qtc_metadata"]["qtc.recipe"]


def _no_output(case):
    assert not case["out"].exists() and not case["out"].with_name("x.qtc.json").exists()


def test_truncated_model(case):
    cut = case["tmp"] / "cut.onnx"
    cut.write_bytes(case["model"].read_bytes()[:5000])
    assert_bad_input(qtc("compile", cut, "--recipe", "w8a16", "-o", case["out"]), "cut.onnx")
    _no_output(case)


def test_not_onnx(case):
    fake = case["tmp"] / "fake.onnx"
    fake.write_text("这不是模型\n" * 50)
    assert_bad_input(qtc("compile", fake, "--recipe", "w8a16", "-o", case["out"]), "fake.onnx")
    _no_output(case)


def test_unknown_recipe(case):
    assert_bad_input(qtc("compile", case["model"], "--recipe", "w3a3", "-o", case["out"]), "unknown recipe 'w3a3'")
    _no_output(case)


def test_recipe_yaml_with_unknown_key(case):
    recipe = case["tmp"] / "r.yaml"
    recipe.write_text("base: w8a8\nweights: {dtype: int8}\n")
    assert_bad_input(qtc("compile", case["model"], "--recipe", recipe, "-o", case["out"]), "unknown key 'weights'")
    _no_output(case)


def test_missing_calibration_file(case):
    result = qtc("compile", case["model"], "--recipe", "w8a8", "--calib", case["tmp"] / "nope.txt", "-o", case["out"])
    assert_bad_input(result, "nope.txt")
    _no_output(case)


def test_static_recipe_without_calibration(case):
    assert_bad_input(qtc("compile", case["model"], "--recipe", "w8a8", "-o", case["out"]), "needs calibration data")
    _no_output(case)


def test_external_data_escaping_folder(case):
    import onnx_ir as ir

    model = ir.load(case["model"])
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value._location = "../../secrets.bin"
            break
    evil = case["tmp"] / "model" / "evil.onnx"
    ir.save(model, evil)
    assert_bad_input(qtc("compile", evil, "--recipe", "w8a16", "-o", case["out"]), "outside the model's folder")
    _no_output(case)


def test_tokenizer_larger_than_embedding(case):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(case["model"].parent / "tokenizer.json"))
    rows = tokenizer.get_vocab_size()
    tokenizer.add_tokens([f"额外{i}" for i in range(10)])
    big = case["tmp"] / "big-tokenizer.json"
    tokenizer.save(str(big))
    result = qtc("compile", case["model"], "--recipe", "w8a8", "--calib", case["corpus"], "--tokenizer", big,
                 "--samples", "2", "--seq-len", "32", "-o", case["out"])
    assert_bad_input(result, f"embedding has {rows} rows")
    _no_output(case)


def test_output_equal_to_input(case):
    before = case["model"].read_bytes()
    assert_bad_input(qtc("compile", case["model"], "--recipe", "w8a16", "-o", case["model"]), "input model itself")
    assert case["model"].read_bytes() == before


def test_symlinked_data_leaving_the_folder_is_refused(case):
    data = case["model"].parent / "model.onnx.data"
    data.rename(case["tmp"] / "elsewhere.data")
    data.symlink_to(case["tmp"] / "elsewhere.data")
    assert_bad_input(qtc("compile", case["model"], "--recipe", "w8a16", "-o", case["out"]), "outside the model's folder")
    _no_output(case)


def test_bad_option_is_one_line(case):
    assert_bad_input(qtc("compile", case["model"], "--calibrator", "magic"), "magic")


def test_max_drop_table_lists_each_attempt_and_the_layers_kept(tiny_llama, tmp_path):
    out = tmp_path / "m.onnx"
    result = qtc("compile", tiny_llama, "--recipe", "w4a16", "--calib", "zh-news", "--samples", "4", "--seq-len", "64",
                 "--max-drop", "kl=0.002", "-o", out)
    assert result.returncode == 0, result.stderr
    attempts = [line for line in result.stdout.splitlines() if "attempt" in line]
    # every attempt reuses what the sensitivity analysis streamed (w4a16: no smoothing, so no final recompile)
    assert len(attempts) >= 3 and "0 kept" in attempts[0] and all("calibration reused" in a for a in attempts)
    assert "<= 0.002 with" in result.stdout and "kept" in result.stdout and out.is_file()


@pytest.mark.parametrize("where", ["file-as-folder", "system"])
def test_unwritable_output_is_one_line_before_any_work(case, where):
    blocker = case["tmp"] / "a-file"
    blocker.write_text("x")
    out = blocker / "x.onnx" if where == "file-as-folder" else "/proc/qtc-nope/x.onnx"
    result = qtc("compile", case["model"], "--recipe", "w8a16", "-o", out)
    assert_bad_input(result, f"cannot write {out}")
    assert "calibrat" not in result.stdout  # refused before the compile started


def test_cross_compile_for_cuda_on_a_machine_without_it(case):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: nothing to cross-compile")
    result = qtc("compile", case["model"], "--recipe", "w8a8", "--calib", case["corpus"], "--samples", "4",
                 "--seq-len", "32", "--target", "cuda", "-o", case["out"], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["target"] == "cuda" and report["calibrated_on"] == "cpu"
    assert any(note.startswith("cross-compiled") for note in report["target_notes"])
    assert case["out"].is_file()


def test_unwritable_cache_is_one_line(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, "-m", "qtc.cli.main", "export", "zh-tiny-lm", "--kv-cache"],
                            capture_output=True, text=True, env=os.environ | {"QTC_CACHE": str(blocker / "cache")})
    assert_bad_input(result, "cannot be created")


CUT_OFF_SAVE = """
import resource, sys
import qtc
from qtc.errors import QtcError
result = qtc.compile(sys.argv[1], recipe="w8a16", compare=False, quiet=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # from here on no file may grow past 1 MB
try:
    result.save(sys.argv[2])
except QtcError as exc:
    sys.exit(f"qtc: error: {exc}")
"""


def test_an_output_cut_off_mid_write_is_one_line_and_leaves_nothing(case):
    """RLIMIT_FSIZE makes the kernel refuse writes past 1 MB (EFBIG; Python ignores SIGXFSZ) once the model is
    compiled: its 11 MB external data file is cut off mid-write, as on a full disk. A QtcError (the CLI's exit 2)
    naming the output, no file or staging folder left, input untouched."""
    before = {p.name: p.read_bytes() for p in case["model"].parent.iterdir()}
    result = subprocess.run([sys.executable, "-c", CUT_OFF_SAVE, str(case["model"]), str(case["out"])],
                            capture_output=True, text=True)
    assert result.stderr.strip().splitlines() == [f"qtc: error: cannot write {case['out']}: File too large"]
    assert not case["out"].parent.exists() or list(case["out"].parent.iterdir()) == []
    assert {p.name: p.read_bytes() for p in case["model"].parent.iterdir()} == before


def test_ctrl_c_mid_compile_is_one_line_and_leaves_nothing(case):
    # SIGINT as a terminal delivers it: a suite started in the background by a non-interactive shell runs with
    # SIGINT ignored, which its children would inherit (the compile then finished, exit 0, in session 8's CI run)
    process = subprocess.Popen([sys.executable, "-m", "qtc.cli.main", "compile", str(case["model"]), "--recipe",
                                "w8a8", "--calib", str(case["corpus"]), "--samples", "4000", "--seq-len", "128", "-o",
                                str(case["out"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(8)  # inside the compile: imports take ~3 s, the whole compile ~25 s on a quiet 2-core box
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["qtc: error: interrupted; nothing was written"]
    assert not case["out"].parent.exists() or list(case["out"].parent.iterdir()) == []


def test_sigterm_mid_compile_is_one_line_and_removes_its_scratch_folders(case, tmp_path):
    """A scheduler's or CI's kill ends a compile like Ctrl-C: its scratch folders (spilled weights, boundary
    values: tens of GB for a 7B model) go with it."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "qtc.cli.main", "compile", str(case["model"]), "--recipe",
                                "w8a8", "--calib", str(case["corpus"]), "--samples", "4000", "--seq-len", "128",
                                "--memory-limit", "30MB", "-o", str(case["out"])], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.monotonic() + 120
    while not any(p.name.startswith("qtc-") for p in scratch.iterdir()) and process.poll() is None:
        assert time.monotonic() < deadline, "the compile made no scratch folder"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "qtc: error: interrupted; nothing was written"
    assert [p.name for p in scratch.iterdir() if p.name.startswith("qtc-")] == []
    assert not case["out"].parent.exists() or list(case["out"].parent.iterdir()) == []


def test_the_cli_runs_in_a_worker_thread():
    """Signal handlers can only be set on the main thread: a pipeline that calls the CLI's main() from a worker
    thread gets its command run, not a ValueError from installing the SIGTERM handler."""
    import threading

    from qtc.cli.main import main

    outcome = {}

    def run():
        try:
            main.main(["recipes"], prog_name="qtc")
        except SystemExit as exc:
            outcome["code"] = exc.code

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(60)
    assert outcome == {"code": 0}
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("value", ["lots", "5KB", "-1GB", "6XB"])
def test_bad_memory_limit_is_one_line(case, value):
    assert_bad_input(qtc("compile", case["model"], "--recipe", "w4a16", "--memory-limit", value, "-o", case["out"]),
                     "--memory-limit takes a size")
