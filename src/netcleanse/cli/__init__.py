"""The ``netcleanse`` command: a thin shell over the Python API.

Each group of commands lives in its own module and registers itself on :data:`app`.
Errors that are the user's (:class:`NetcleanseError`, and OSError: a missing file, a read-only or
full disk) print one line to stderr
and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings

import typer

from ..errors import NetcleanseError, NetcleanseWarning

def _flags_without_type(params: list) -> list:
    """Typer's help shows a flag as ``--resume <bool>``, as if it took a value: give flags no type."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))


app = typer.Typer(name="netcleanse", no_args_is_help=True, add_completion=False, cls=_Group,
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
from . import screen as _screen  # noqa: E402,F401


class _OnceCommand(typer.core.TyperCommand):
    """A command whose single-value options may be given once: click keeps the last of
    ``--clean A --clean B`` silently, so a user would evaluate B believing A was included."""

    def parse_args(self, ctx, args):
        seen = set()
        _, _, order = self.make_parser(ctx).parse_args(args=list(args))
        for param in order:
            if param.param_type_name != "option" or param.multiple or param.is_flag or param.count:
                continue
            if param.name in seen:
                ctx.fail(f"{param.opts[0]} is given more than once; give it once")
            seen.add(param.name)
        return super().parse_args(ctx, args)

    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))


for _info in app.registered_commands:
    if _info.cls in (None, typer.core.TyperCommand):
        _info.cls = _OnceCommand


# typer re-exports only BadParameter; its base is click's UsageError (vendored inside typer since
# 0.2x, a separate package before), the class of every command-line mistake: missing argument,
# unknown option, a value that does not parse
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _show_warning(message, category, filename, lineno, file=None, line=None, _python=warnings.showwarning):
    if issubclass(category, NetcleanseWarning):
        from ..sanity import warn
        warn(str(message))  # the one "warning:" line, as the commands' own checks print theirs
    else:
        _python(message, category, filename, lineno, file, line)


def stop_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's or `kill`'s) stop a command as Ctrl-C does: its work cancelled
    and closed (Ray tasks too), an unfinished scan said to be resumable; exit status 143. Installed
    by :func:`main`, and again once Ray has started, which sets a handler of its own (that one aborts
    the process with a stack dump)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def terminated(signum, frame):
        _state["terminated"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)


def main(argv: list[str] | None = None) -> None:
    warnings.showwarning = _show_warning
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    _state["terminated"] = False
    stop_on_sigterm()
    try:
        _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    try:
        # not standalone: typer would print its usage errors as a multi-line box; we print one line
        code = app(args=argv, prog_name="netcleanse", standalone_mode=False)
    except SystemExit:
        raise
    except KeyboardInterrupt:  # outside a command; typer turns Ctrl-C inside one into exit code 130
        code = 130
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except _UsageError as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())  # bare `netcleanse` (or a bare group): the help is the answer
            sys.exit(2)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"error: {' '.join(exc.format_message().split())}{where}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (NetcleanseError, OSError) as exc:  # OSError: a missing file, a read-only or full disk
        if _state["debug"] or "--debug" in (argv or sys.argv):
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
    if code == 130:
        command = next((str(a) for a in (argv if argv is not None else sys.argv[1:]) if not str(a).startswith("-")), "")
        hint = "; run it again with --resume to continue where it stopped" if command in ("scan", "screen") else ""
        print(f"{'terminated' if _state.get('terminated') else 'interrupted'}{hint}", file=sys.stderr)
        if _state.get("terminated"):
            code = 143  # 128 + SIGTERM, as the shell reports a process SIGTERM ended
    sys.exit(code if isinstance(code, int) else 0)
