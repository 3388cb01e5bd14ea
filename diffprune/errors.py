"""The one exception type that reaches users as a one-line message instead of a traceback."""


class DiffpruneError(Exception):
    """A problem with the user's input (file, key, value) that they can fix.

    The CLI prints ``str(error)`` on one line and exits non-zero; everything else is a bug.
    """

    exit_code = 2
