"""CLI commands: repair (see netcleanse.cli)."""

from . import app  # noqa: F401
