"""CLI commands: lab (see netcleanse.cli)."""

from . import app  # noqa: F401
