"""Where the CLI's output goes, on a terminal and off one (a pipe, a log file, CI).

- Results print as tables whose numbers are never cut: off a terminal rich would assume 80
  columns and elide cells ("…"), so the console there is as wide as the table needs.
- Long work shows progress on stderr: a spinner (or bar) with the current stage on a terminal;
  off one, a line per stage with the elapsed time, so a log shows where the time went.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

from rich.console import Console

OFF_TERMINAL_WIDTH = 400  # wider than any table here: tables keep their natural width


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else OFF_TERMINAL_WIDTH)


@contextlib.contextmanager
def stages(description: str) -> Iterator[Callable[[str], None]]:
    """Yields ``report(message)``: the stage now running. Warnings (messages starting "warning")
    and indented detail lines always print as lines."""
    err = console(stderr=True)
    start = time.perf_counter()

    def line(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)

    if not err.is_terminal:
        line(description)
        yield lambda message: line(message.strip())
        return
    with err.status(description) as status:
        def report(message: str) -> None:
            if message.startswith(("warning", "  ")):
                err.print(message, highlight=False)
            else:
                status.update(message)

        yield report


@contextlib.contextmanager
def counter(description: str) -> Iterator[Callable[[int, int], None]]:
    """Yields ``report(done, total)``: a bar on a terminal; off one, a line at every tenth."""
    err = console(stderr=True)
    if not err.is_terminal:
        start, printed = time.perf_counter(), set()

        def line(done: int, total: int) -> None:
            tenth = 10 * done // max(total, 1)
            if tenth not in printed:
                printed.add(tenth)
                print(f"[{time.perf_counter() - start:7.1f} s] {description} {done}/{total}", file=sys.stderr, flush=True)

        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=err, transient=True)
    task = bar.add_task(description, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total)
