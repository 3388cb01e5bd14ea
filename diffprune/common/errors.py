"""The one exception type that reaches users as a one-line message instead of a traceback."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors that
    quote a library's reason."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


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
