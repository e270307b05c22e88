"""Progress bars for long work (calibration, evaluation), on stderr so that --json output stays clean."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int, quiet: bool = False) -> Iterator[Callable[..., None]]:
    """Yields `advance(note=None)`; shows samples done, elapsed time and ETA unless quiet. A `note` is shown after
    the description from then on (segmented calibration: which segment). Where stderr is not a terminal (a CI
    log, a pipeline's captured output) a plain line every LOG_EVERY_S seconds says the same: an hour-long compile
    of a 7B model must not look hung."""
    if quiet:
        yield lambda note=None: None
        return
    if not sys.stderr.isatty():
        yield _log_lines(description, total)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console, transient=False) as progress:
        task = progress.add_task(description, total=total)

        def advance(note: str | None = None) -> None:
            if note is not None:
                progress.update(task, description=f"{description} {note}")
            progress.advance(task)

        yield advance


LOG_EVERY_S = 30.0


def _log_lines(description: str, total: int) -> Callable[..., None]:
    state = {"done": 0, "note": None, "start": time.monotonic(), "last": time.monotonic()}

    def advance(note: str | None = None) -> None:
        state["done"] += 1
        state["note"] = note if note is not None else state["note"]
        now = time.monotonic()
        if now - state["last"] < LOG_EVERY_S:
            return
        state["last"] = now
        elapsed = now - state["start"]
        eta = elapsed / state["done"] * (total - state["done"])
        where = f" {state['note']}" if state["note"] else ""
        print(f"{description}{where}: {state['done']}/{total}, {_clock(elapsed)} elapsed, ETA {_clock(eta)}",
              file=sys.stderr, flush=True)
    return advance


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
