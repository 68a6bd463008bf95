"""The one exception type users see, and the one warning type.

Anything raised as :class:`NetcleanseError` is a problem with the user's input (a file, a
setting) and is reported by the CLI as a single line on stderr with a non-zero exit code.
Anything else is a bug in netcleanse and keeps its traceback.
"""


class NetcleanseError(Exception):
    """A user-facing error; its message is one self-explanatory line."""


class NetcleanseWarning(UserWarning):
    """Something in the user's input that is allowed but probably not meant (an empty label folder);
    the CLI prints it as one ``warning:`` line on stderr, notebooks see a Python warning."""
