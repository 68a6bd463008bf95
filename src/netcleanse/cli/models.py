"""CLI commands: models (see netcleanse.cli)."""

from . import app  # noqa: F401
