"""CLI command ``report``: render the HTML or Markdown report of a scan directory (see netcleanse.report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from ..report import render_report


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(
        help="A scan directory (scan.json, masks.npz), or a directory whose immediate subdirectories hold "
             "the scan and optionally truth.json and repair.json (as `netcleanse demo` writes).",
        show_default=False)],
    format: Annotated[Optional[str], typer.Option(  # noqa: A002
        "--format", help="html (one self-contained file) or md (Markdown + PNG files) [default: the one "
                         "--out's suffix names, else html].", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Report file or directory to write to (a new name without a suffix becomes a directory) "
                      "[default: DIR/report.html or DIR/report.md].",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Write the report of a scan (and of its ground truth and repairs): verdict, plots, triggers, settings."""
    path = render_report(directory, format=format, out=out, force=force)
    typer.echo(f"report written to {path}")
