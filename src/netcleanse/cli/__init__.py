"""The ``netcleanse`` command: a thin shell over the Python API.

Each group of commands lives in its own module and registers itself on :data:`app`.
Errors that are the user's (:class:`NetcleanseError`, missing files) print one line to stderr
and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer

from ..errors import NetcleanseError

app = typer.Typer(name="netcleanse", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="Audit a neural-network classifier for backdoors (Neural Cleanse) and repair it.")

_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _state["debug"] = debug


# Command modules register themselves on `app` when imported.
from . import models as _models  # noqa: E402,F401
from . import scan as _scan  # noqa: E402,F401
from . import lab as _lab  # noqa: E402,F401
from . import repair as _repair  # noqa: E402,F401
from . import report as _report  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (NetcleanseError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        if _state["debug"] or "--debug" in (argv or sys.argv):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
