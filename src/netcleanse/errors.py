"""The one exception type users see.

Anything raised as :class:`NetcleanseError` is a problem with the user's input (a file, a
setting) and is reported by the CLI as a single line on stderr with a non-zero exit code.
Anything else is a bug in netcleanse and keeps its traceback.
"""


class NetcleanseError(Exception):
    """A user-facing error; its message is one self-explanatory line."""
