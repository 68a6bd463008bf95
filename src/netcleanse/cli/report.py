"""CLI commands: report (see netcleanse.cli)."""

from . import app  # noqa: F401
