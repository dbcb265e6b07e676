"""Rich progress bars that fall silent when output is not a terminal or ``--quiet`` is set."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

_QUIET = {"value": False}


def set_quiet(quiet: bool) -> None:
    """Silence every progress bar of this process (the CLI's ``--quiet``)."""
    _QUIET["value"] = quiet


def _enabled(quiet: bool) -> bool:
    return not (quiet or _QUIET["value"] or os.environ.get("CI") or not sys.stderr.isatty())


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def update(self, advance: int = 1, **fields: float) -> None:
        if self._progress is None:
            return
        info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
        self._progress.update(self._task, advance=advance, info=info)


@contextlib.contextmanager
def progress_bar(description: str, total: int, completed: int = 0, quiet: bool = False) -> Iterator[_Bar]:
    """A progress bar over ``total`` items; a no-op when not a TTY or quiet."""
    if not _enabled(quiet):
        yield _Bar(None, None)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield _Bar(progress, task)


def track(items, description: str, quiet: bool = False):
    """Iterate over a sized iterable with a progress bar."""
    items = list(items)
    with progress_bar(description, total=len(items), quiet=quiet) as bar:
        for item in items:
            yield item
            bar.update(1)
