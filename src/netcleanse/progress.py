"""Progress bars with ETA for long work (one style across netcleanse)."""

from __future__ import annotations

import os
import sys

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def progress_bar(disable: bool | None = None) -> Progress:
    """A rich Progress with count, elapsed time and ETA; writes to stderr so stdout stays parseable.

    Disabled when ``NETCLEANSE_NO_PROGRESS`` is set (tests) unless ``disable`` says otherwise.
    """
    if disable is None:
        disable = bool(os.environ.get("NETCLEANSE_NO_PROGRESS"))
    from rich.console import Console
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(file=sys.stderr), disable=disable, transient=False)
