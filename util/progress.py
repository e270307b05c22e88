"""Progress bars for long work (calibration, evaluation), on stderr so that --json output stays clean."""

from __future__ import annotations

import contextlib
import sys
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
    """Yields `advance(note=None)`; shows samples done, elapsed time and ETA unless quiet or stderr is not a
    terminal. A `note` is shown after the description from then on (segmented calibration: which segment)."""
    if quiet or not sys.stderr.isatty():
        yield lambda note=None: None
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
