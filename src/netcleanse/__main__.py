"""``python -m netcleanse``, and the ``netcleanse`` command's entry point: a Ctrl-C while the
command is still importing its modules (torch takes seconds) is one line and exit status 130."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
