"""Progress with ETA for long work (one style across netcleanse), on stderr so stdout stays parseable.

On a terminal: rich's live bars. Elsewhere (a log file, a pipe, a batch job's output) a live bar
cannot redraw, so each task writes a plain line (``description: done/total (percent), elapsed,
ETA``) every :data:`LOG_EVERY_S` seconds (``NETCLEANSE_PROGRESS_EVERY`` to change) and one when it
ends; a ten-minute scan's log then shows where it is.
"""

from __future__ import annotations

import os
import sys
import time

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

LOG_EVERY_S = 30.0


def progress_bar(disable: bool | None = None):
    """A progress display with count, elapsed time and ETA on stderr: rich's bars on a terminal,
    timed lines elsewhere (see the module doc). Both take ``add_task``, ``update``, ``advance``.

    Disabled when ``NETCLEANSE_NO_PROGRESS`` is set (tests) unless ``disable`` says otherwise.
    """
    if disable is None:
        disable = bool(os.environ.get("NETCLEANSE_NO_PROGRESS"))
    if not disable and not _is_terminal(sys.stderr):
        return LineProgress()
    from rich.console import Console
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(file=sys.stderr), disable=disable, transient=False)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """rich's ``Progress`` calls, written as timed lines (module doc)."""

    def __init__(self, every: float | None = None, stream=None):
        if every is None:
            try:
                every = float(os.environ.get("NETCLEANSE_PROGRESS_EVERY", LOG_EVERY_S))
            except ValueError:
                every = LOG_EVERY_S
        self.every, self.stream = every, stream
        self._tasks: dict[int, dict] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:  # a task left unfinished (a stage that stopped early) says where it stopped
            for task_id, task in self._tasks.items():
                if not task["ended"]:
                    self._write(task_id, final=True)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_) -> int:
        task_id = len(self._tasks)
        now = time.monotonic()
        self._tasks[task_id] = {"description": description, "total": total, "completed": float(completed),
                                "start": now, "start_completed": float(completed), "last": now, "ended": False}
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, completed: float | None = None, advance: float | None = None,
               description: str | None = None, total: float | None = None, **_) -> None:
        task = self._tasks[task_id]
        if description is not None:
            task["description"] = description
        if total is not None:
            task["total"] = total
        if completed is not None:
            task["completed"] = float(completed)
        if advance is not None:
            task["completed"] += float(advance)
        done = task["total"] is not None and task["completed"] >= task["total"]
        if done and not task["ended"]:
            self._write(task_id, final=True)
        elif not done and time.monotonic() - task["last"] >= self.every:
            self._write(task_id)

    def _write(self, task_id: int, final: bool = False) -> None:
        task = self._tasks[task_id]
        now = time.monotonic()
        task["last"], task["ended"] = now, final
        elapsed = now - task["start"]
        done, total = task["completed"], task["total"]
        whole = int(done + 1e-9)  # (work counted in fractions, e.g. label-equivalents: whole ones shown, as rich does)
        count = f"{whole}/{total:g} ({100 * done / total:.0f} %)" if total else f"{whole}"
        rate = (done - task["start_completed"]) / elapsed if elapsed > 0 else 0.0
        eta = (f", ETA {_clock((total - done) / rate)}" if total and rate > 0 and done < total else "")
        print(f"{task['description']}: {count}, elapsed {_clock(elapsed)}{eta}",
              file=self.stream or sys.stderr, flush=True)
