"""Progress bars that suit where they are read: a live bar on a terminal, a few plain lines in a log.

In a log (CI, Prefect's flow-run logs, ``make run > log``) tqdm's carriage-return frames pile up into one
long line per bar; there a bar prints one newline-terminated line each time it crosses a tenth of its total,
and its final state when it closes.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm
from tqdm.auto import tqdm as live_tqdm

STEPS = 10  # lines per bar in a log
MODE = "DIFFPRUNE_PROGRESS"  # "live" or "lines": set by a parent whose stderr the child's pipe stands for


class LogLines(tqdm):
    """tqdm that writes a line at each tenth of ``total`` (and at the end), never a carriage return."""

    def __init__(self, *args, **kwargs):
        self._shown = (-1, -1)  # (tenth, n) of the last line written
        kwargs.update(mininterval=0, miniters=1, bar_format="{l_bar}{r_bar}", dynamic_ncols=False, ncols=0)
        super().__init__(*args, **kwargs)

    def _tenth(self) -> int:
        return int(STEPS * self.n / self.total) if self.total else 0

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":
            return False  # tqdm clearing its line: there is none to clear (and no carriage return follows)
        if self.n == self._shown[1] or self._tenth() == self._shown[0]:
            return True  # nothing new worth a line
        self._write()
        return True

    def _write(self) -> None:
        self._shown = (self._tenth(), self.n)
        self.fp.write(self.__str__().rstrip("| ") + "\n")
        self.fp.flush()

    def close(self) -> None:
        if not self.disable and self.n != self._shown[1]:
            self._write()  # where it stopped (a scoring pass that ends early never reaches its total)
        self.leave = False  # the last line is written; tqdm would add an empty one
        super().close()


def interactive(stream=None) -> bool:
    """Whether progress on ``stream`` (default stderr) is read live: ``$DIFFPRUNE_PROGRESS``, else a TTY test."""
    mode = os.environ.get(MODE, "").strip().lower()
    if mode in ("live", "lines"):
        return mode == "live"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def child_env() -> dict[str, str]:
    """For a child process whose stderr this process pipes through: draw bars the way this one would."""
    return {MODE: "live" if interactive() else "lines"}


def bar(*args, **kwargs) -> tqdm:
    """A tqdm bar (same arguments) that becomes :class:`LogLines` when nobody reads it live."""
    return (live_tqdm if interactive(kwargs.get("file")) else LogLines)(*args, **kwargs)
