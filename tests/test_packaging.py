"""The wheel: built without setuptools warnings, holding the package and its data, not tests, bench or tools."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_clean_and_ships_no_tests(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    log = build.stdout + build.stderr
    assert "BuildBackendWarning" not in log and "is absent from the `packages`" not in log, log[-3000:]
    (wheel,) = tmp_path.glob("qtc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[1] for n in names if n.startswith("qtc/") and n.count("/") > 1}
    assert top == {"backends", "calibration", "cli", "core", "frontends", "measure", "models", "passes", "recipes",
                   "util"}
    assert not any(n.startswith(("qtc/tests/", "qtc/bench/", "qtc/tools/")) for n in names)
    assert "qtc/recipes/builtin/w8a8.yaml" in names and "qtc/backends/cann_kernels.json" in names
    assert "qtc/models/weights/zh-tiny-lm.safetensors" in names
