"""CLI commands: scan (see netcleanse.cli)."""

from . import app  # noqa: F401
