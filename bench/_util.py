"""Helpers shared by the benchmark scripts: fresh-subprocess workers, peak RSS, tables, JSON results."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from qtc.util.spill import peak_rss

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MiB = 1 << 20


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far: qtc's own VmHWM reading (see qtc.util.spill.peak_rss), else
    ru_maxrss where /proc is missing."""
    return peak_rss() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples this process's RSS every `interval` s in a thread, with labelled phases: where the peak happens."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = current_rss_bytes()
            if rss > self.peaks.get(self.phase, 0):
                self.peaks[self.phase] = rss
            time.sleep(self.interval)

    def mark(self, phase: str) -> None:
        self.phase = phase

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_worker(script: Path, args: list[str], result_path: Path, timeout: float | None = None) -> dict:
    """Run `python script --worker ... --result result_path` in a fresh process; return its JSON result."""
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), *args, "--result", str(result_path)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or not result_path.is_file():
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"ok": False, "returncode": proc.returncode, "error": tail, "process_seconds": round(elapsed, 2)}
    data = json.loads(result_path.read_text())
    data["ok"] = True
    data["process_seconds"] = round(elapsed, 2)
    return data


def run_measured(command: list[str], stdout: Path) -> tuple[float, int, float]:
    """Wall seconds, os.wait4's peak RSS (bytes) and CPU seconds (user + system: what the work cost, on a machine
    shared with other jobs too) of a command in a fresh process (its stdout to `stdout`); a failure stops the
    script with the command's stderr."""
    started = time.perf_counter()
    with open(stdout, "w") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        err.seek(0)
        stderr = err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command[:4])}: {stderr.strip()[-2000:]}")
    return round(seconds, 1), usage.ru_maxrss * 1024, round(usage.ru_utime + usage.ru_stime, 1)


def write_worker_result(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_results(name: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def machine() -> dict:
    import platform

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    try:
        flags = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
        info["cpu_flags"] = [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    for pkg in ("onnxruntime", "onnx", "onnx_ir", "numpy"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - informational only
            pass
    return info


def qtc_json(*args: str, keep: Path | None = None) -> dict:
    """Run a qtc CLI command for its JSON (a failure stops the script with qtc's own message), adding the wall
    seconds it took as `_seconds`; with `keep`, the result is kept there and a rerun reads it back."""
    if keep is not None and keep.is_file():
        return json.loads(keep.read_text())
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qtc.cli.main", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"qtc {' '.join(args)}: {done.stderr.strip()}")
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(done.stdout)
    result = json.loads(done.stdout)
    result["_seconds"] = round(time.perf_counter() - started, 1)
    return result
