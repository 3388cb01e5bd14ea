"""Progress on a terminal vs in a log: a line per tenth, never a carriage return, the end always shown."""

import io

from tqdm.auto import tqdm as live_tqdm

from diffprune.common import progress
from diffprune.common.progress import LogLines, bar


def _lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert "\r" not in text
    return text.splitlines()


def test_a_bar_in_a_log_writes_one_line_per_tenth_and_the_end():
    out = io.StringIO()
    b = bar(total=800, desc="train", unit="step", file=out)
    for _ in range(800):
        b.update(1)
    b.set_postfix(loss="0.0046")
    b.close()
    lines = _lines(out)
    assert isinstance(b, LogLines) and len(lines) == 11  # 0 %, 10 %, …, 100 %
    assert lines[0].startswith("train:   0% 0/800") and lines[-1].startswith("train: 100% 800/800")


def test_a_bar_that_stops_early_shows_where_and_a_resumed_one_where_it_began():
    out = io.StringIO()
    b = bar(total=1000, desc="score", unit="t", leave=False, file=out)
    b.update(462)
    b.close()
    assert _lines(out)[-1].startswith("score:  46% 462/1000")
    out = io.StringIO()
    with bar(total=50, initial=20, desc="train", file=out) as b:
        b.update(30)
    lines = _lines(out)
    assert lines[0].startswith("train:  40% 20/50") and lines[-1].startswith("train: 100% 50/50") and len(lines) == 2


def test_iterating_and_disabled_bars():
    out = io.StringIO()
    assert list(bar(range(5), desc="epochs", file=out, leave=False)) == list(range(5))
    assert len(_lines(out)) == 6
    out = io.StringIO()
    b = bar(total=10, disable=True, file=out)
    b.update(10)
    b.close()
    assert out.getvalue() == ""


def test_the_mode_follows_the_terminal_or_the_parent(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv(progress.MODE, raising=False)
    assert not isinstance(bar(total=1, file=Terminal()), LogLines)
    monkeypatch.setenv(progress.MODE, "lines")  # a parent that pipes our stderr into its log
    assert isinstance(bar(total=1, file=Terminal()), LogLines)
    assert progress.child_env() == {progress.MODE: "lines"}
    monkeypatch.setenv(progress.MODE, "live")  # a parent whose own stderr is a terminal
    assert isinstance(bar(total=1, file=io.StringIO()), live_tqdm)
    assert progress.child_env() == {progress.MODE: "live"}
