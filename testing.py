"""Helpers for users' own pytest suites: `assert_parity` gates a compiled model in CI."""

from __future__ import annotations

import os

from qtc.measure.parity import parity


def assert_parity(
    model: str | os.PathLike,
    *,
    backends: tuple[str, ...] = ("cpu",),
    against: str | os.PathLike | None = None,
    inputs: str = "zh-news",
    require: tuple[str, ...] = ("cpu",),
    **options,
) -> dict:
    """Fail (AssertionError listing every violation) when MODEL is outside tolerance on any available backend,
    or against AGAINST; fail too when a backend in `require` is unavailable. Returns the parity result."""
    result = parity(model, list(backends), against=against, inputs=inputs, **options)
    missing = [f"{name} unavailable: {entry['reason']}" for name, entry in result["backends"].items()
               if name in require and not entry["available"]]
    problems = missing + result["failures"]
    assert not problems, "parity failed:\n  " + "\n  ".join(problems)
    return result
