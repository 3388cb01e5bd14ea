"""The one exception type that reaches users as a one-line message instead of a traceback."""


class DiffpruneError(Exception):
    """A problem with the user's input (file, key, value) that they can fix.

    The CLI prints ``str(error)`` on one line and exits non-zero; everything else is a bug.
    """

    exit_code = 2


class OutputWriteError(DiffpruneError):
    """The environment refused a write (disk full, quota, file-size limit, permissions, read-only file system).

    Not the user's input and not a bug: the message names the path and the OS error; nothing half-written
    is left behind (the atomic writers remove their scratch copy), so a re-run after the fix starts clean.
    """

    exit_code = 3
