"""Execution-provider backends. Each module defines one `Backend`; `get_backend` looks them up by target name."""

from qtc.backends.base import Backend
from qtc.backends.cpu import CPU
from qtc.errors import QtcError

BACKENDS: dict[str, Backend] = {CPU.name: CPU}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise QtcError(f"unknown target {name!r} (available: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[name]
