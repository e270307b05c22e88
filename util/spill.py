"""Tensors made during a compile, moved to a scratch file as soon as they are made, for models whose weights do
not fit in memory next to their quantized copies.

A pass that makes a large tensor (quantized weights, packed blocks, scales) hands it to `spill()`. Outside a
`spilling(store)` block that returns the tensor unchanged; inside, a tensor of at least `store.min_bytes` is written
to the store's file and comes back as an `ir.ExternalTensor` that reads it memory-mapped on demand, so the
process holds one tensor at a time, not the model. Saving the model copies each one into the output's own
external data, as it does for the source's.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import onnx_ir as ir

ALIGN = 4096  # page-aligned offsets: each spilled tensor maps on its own pages
DATA_FILE = "spill.data"

_active: contextvars.ContextVar[SpillStore | None] = contextvars.ContextVar("qtc_spill_store", default=None)


class SpillStore:
    """One scratch file in a private temporary folder; `close()` removes both."""

    def __init__(self, parent: str | Path | None = None, min_bytes: int = 1 << 20) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="qtc-spill-", dir=parent))
        self.file = open(self.folder / DATA_FILE, "wb")  # noqa: SIM115 - lives as long as the store
        self.min_bytes = min_bytes
        self.bytes = 0
        self.tensors = 0
        # also when a compile fails or is interrupted before anything owns the store: the folder goes with the
        # store object, or at interpreter exit (a 7B compile spills ~9 GB here)
        self._remove = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def put(self, tensor: ir.TensorProtocol) -> ir.TensorProtocol:
        if tensor.nbytes < self.min_bytes or isinstance(tensor, ir.ExternalTensor):
            return tensor
        offset = self.file.tell() + (-self.file.tell() % ALIGN)
        self.file.seek(offset)
        data = tensor.tobytes()
        self.file.write(data)
        self.file.flush()  # readers map the file right away
        self.bytes += len(data)
        self.tensors += 1
        return ir.ExternalTensor(DATA_FILE, offset, len(data), tensor.dtype, shape=tensor.shape, name=tensor.name,
                                 base_dir=self.folder)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        self._remove()

    def summary(self) -> dict:
        return {"tensors": self.tensors, "bytes": self.bytes}


@contextlib.contextmanager
def spilling(store: SpillStore | None):
    """Within the block, `spill()` writes large tensors to `store` (None: keep everything in memory)."""
    token = _active.set(store)
    try:
        yield store
    finally:
        _active.reset(token)


def spill(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    store = _active.get()
    return store.put(tensor) if store is not None else tensor


def release(tensor: ir.TensorProtocol | None) -> None:
    """Unmap an external tensor once it has been read (source weights, spilled ones): mapped pages count as
    resident memory for as long as the mapping lives; a later read maps it again."""
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None


_LIBC = _libc()


def trim_heap() -> None:
    """Hand the heap's free pages back to the system. glibc keeps what a closed ONNX Runtime session freed (its
    arena, its pre-packed weights) inside the process, so the next step's own memory lands on top of the last
    session's: a 7B segment session's 1 GB stayed resident while GPTQ factored a 1.4 GB matrix beside it."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _proc_bytes(path: str, field: str) -> int | None:
    """A `Field:   N kB` line of a /proc file, in bytes; None where the file or the field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int:
    """MemAvailable of /proc/meminfo (what can be used without swapping), else 8 GiB where there is none."""
    return _proc_bytes("/proc/meminfo", "MemAvailable") or 8 << 30


_peak_before_reset = 0  # the highest VmHWM seen before a PeakTracker reset it (peak_rss stays "since start")


def peak_rss() -> int | None:
    """This process's peak resident set size so far: VmHWM of /proc/self/status (not ru_maxrss, which Linux carries
    across fork + execve from the parent), and no less than it was before a PeakTracker reset it; None where
    there is none."""
    current = _proc_bytes("/proc/self/status", "VmHWM")
    return None if current is None else max(current, _peak_before_reset)


class PeakTracker:
    """Peak RSS and wall seconds per step of a long job (which pass held the memory and the time), and peak RSS
    over the whole process. Linux resets a process's VmHWM when "5" is written to /proc/self/clear_refs; where
    that is not possible the per-step figures are the process peak so far (still an upper bound)."""

    def __init__(self) -> None:
        self.overall = peak_rss() or 0
        self.steps: list[tuple[str, int]] = []
        self.seconds: list[tuple[str, float]] = []

    def step(self, name: str, run):
        """Run `run()` as the step `name` and return what it returns."""
        trim_heap()  # each step's peak is its own, not the heap a step before it freed and glibc kept
        resettable = _reset_peak_rss()
        started = time.perf_counter()
        result = run()
        self.seconds.append((name, time.perf_counter() - started))
        peak = _proc_bytes("/proc/self/status", "VmHWM") or 0
        self.overall = max(self.overall, peak)
        self.steps.append((name, peak if resettable else self.overall))
        return result


def _reset_peak_rss() -> bool:
    global _peak_before_reset
    _peak_before_reset = peak_rss() or 0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
