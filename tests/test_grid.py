"""`qtc table`: a recipe x calibration grid, in-process and on a local Ray cluster, with the same results; finished
cells are not redone; a cell that fails for a real reason is reported and the rest finish."""

import json

import pytest

from qtc.grid import cells_of, run_grid, write_table
from tests.cli.test_main import assert_bad_input, qtc

RECIPES = ["w8a8", "w4a16"]
CALIBS = ["zh-news", "en-pydoc"]


def _cells(model):
    return cells_of(model, RECIPES, CALIBS, samples=4, seq_len=32, seed=0, task="zh-news-ppl", limit=3)


def _json_of(prefix):
    return json.loads(prefix.with_name(prefix.name + ".json").read_text())


def test_serial_grid_resumes_without_redoing_cells(kv_decoder, tmp_path):
    prefix = tmp_path / "grid"
    statuses = []
    results = run_grid(_cells(kv_decoder), prefix, report=statuses.append)
    assert [r["cell"] for r in results] == ["w8a8@zh-news", "w4a16@zh-news", "w8a8@en-pydoc", "w4a16@en-pydoc"]
    assert all("metrics" in r for r in results) and statuses[-1]["done"] == 4
    # static w8a8 ranges depend on the calibration text; weight-only w4a16 does not
    by = {r["cell"]: r for r in results}
    assert by["w8a8@zh-news"]["metrics"]["kl_per_token"] != by["w8a8@en-pydoc"]["metrics"]["kl_per_token"]
    assert by["w4a16@zh-news"]["data_sha256"] == by["w4a16@en-pydoc"]["data_sha256"]
    write_table(results, prefix, "zh-tiny-lm")
    again = []
    assert run_grid(_cells(kv_decoder), prefix, report=again.append) == results
    assert again == [{"done": 4, "running": 0, "failed": 0, "total": 4, "eta_s": None}]  # nothing recomputed
    assert (tmp_path / "grid.md").is_file() and (tmp_path / "grid.png").is_file()


def test_ray_grid_equals_the_serial_grid(kv_decoder, tmp_path):
    ray = pytest.importorskip("ray")
    serial, on_ray = tmp_path / "serial", tmp_path / "ray"
    write_table(run_grid(_cells(kv_decoder), serial), serial, "zh-tiny-lm")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        write_table(run_grid(_cells(kv_decoder), on_ray, ray_address="local"), on_ray, "zh-tiny-lm")
    finally:
        ray.shutdown()
    assert _json_of(on_ray) == _json_of(serial)


def test_a_failing_cell_is_reported_and_the_rest_finish(kv_decoder, tmp_path):
    cells = cells_of(kv_decoder, ["w8a16"], ["zh-news", str(tmp_path / "missing.txt")], 4, 32, 0, "zh-news-ppl", 2)
    results = run_grid(cells, tmp_path / "grid")
    assert "metrics" in results[0] and "calibration data not found" in results[1]["error"]


def test_cli(kv_decoder, tmp_path):
    prefix = tmp_path / "t"
    shown = qtc("table", kv_decoder, "--recipes", "w8a16", "--calib", "zh-news", "--limit", "2", "--samples", "4",
                "--seq-len", "32", "-o", prefix, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["cells"][0]["cell"] == "w8a16@zh-news"
    assert_bad_input(qtc("table", kv_decoder, "--recipes", "w9a9", "--calib", "zh-news", "-o", prefix), "w9a9")
    assert_bad_input(qtc("table", kv_decoder, "--recipes", ",", "--calib", "zh-news", "-o", prefix), "at least one recipe")


def test_resource_requests_need_ray(kv_decoder, tmp_path):
    assert_bad_input(qtc("table", kv_decoder, "--recipes", "w8a16", "--calib", "zh-news", "--gpus-per-cell", "1",
                         "-o", tmp_path / "t"), "Ray resource requests: add --ray")
    assert_bad_input(qtc("table", kv_decoder, "--recipes", "w8a16", "--calib", "zh-news", "--memory-per-cell", "big",
                         "--ray", "local", "-o", tmp_path / "t"), "--memory-per-cell takes a size")
