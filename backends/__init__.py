"""Execution-provider backends. Each module defines one `Backend`; `get_backend` looks them up by name."""

from qtc.backends.base import Backend
from qtc.backends.cann import CANN
from qtc.backends.cpu import CPU
from qtc.backends.cuda import CUDA
from qtc.errors import QtcError

BACKENDS: dict[str, Backend] = {b.name: b for b in (CPU, CUDA, CANN)}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise QtcError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[name]


def compile_target(name: str) -> Backend:
    """A backend `qtc compile --target` can produce graphs for."""
    backend = get_backend(name)
    if not backend.compiles:
        ready = ", ".join(sorted(b.name for b in BACKENDS.values() if b.compiles))
        raise QtcError(f"compiling for target {name!r} needs its legalization passes, not built yet (targets: {ready})")
    return backend
