"""The README's Layout block names the real tree: every module under its own room, and only modules that exist.

The block (the fenced code block under ``## Layout``) has one entry per room: a line that starts in the
first column with the room's folder (``diffprune/family/``) and what it holds, continued on indented lines.
Every bare ``name.py`` on an entry's lines is a module of that room.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# A module name standing alone: not the tail of a path (``common/runtime.py``) or of a longer word.
MODULE = re.compile(r"(?<![\w./-])([A-Za-z_]\w*\.py)(?![\w.])")
NOT_LISTED = {"__init__.py", "__main__.py"}  # may be named, need not be


def layout_block(text: str) -> str:
    """The first fenced code block after the ``## Layout`` heading, before the next heading."""
    match = re.search(r"^## Layout[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, "README.md has no '## Layout' section"
    block = re.search(r"^```[^\n]*\n(.*?)^```", match.group(1), flags=re.M | re.S)
    assert block, "the Layout section has no code block"
    return block.group(1)


def entries(block: str) -> dict[str, list[str]]:
    """Entry name (a room ``folder/`` or a top-level file) → the module names on its lines."""
    out: dict[str, list[str]] = {}
    current = None
    for line in block.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            current = line.split()[0]
            assert current not in out, f"Layout names {current} twice"
            out[current] = []
            line = line[len(current):]
        assert current is not None, f"Layout: an indented line before any room: {line!r}"
        out[current].extend(MODULE.findall(line))
    return out


def code_rooms() -> dict[str, set[str]]:
    """Every folder of Python modules the layout must cover: ``diffprune/``, each of its subpackages,
    ``tasks/`` and ``flows/`` → the modules in it."""
    folders = [ROOT / "diffprune", *sorted(p for p in (ROOT / "diffprune").iterdir() if p.is_dir()),
               ROOT / "tasks", ROOT / "flows"]
    rooms = {}
    for folder in folders:
        modules = {p.name for p in folder.glob("*.py")}
        if modules:  # assets/, __pycache__/: no modules, no room
            rooms[folder.relative_to(ROOT).as_posix() + "/"] = modules
    return rooms


@pytest.fixture(scope="module")
def layout() -> dict[str, list[str]]:
    return entries(layout_block(README.read_text(encoding="utf-8")))


def test_every_code_room_is_in_the_layout(layout):
    missing = sorted(set(code_rooms()) - set(layout))
    assert not missing, f"README Layout has no line for {missing}"


@pytest.mark.parametrize("room", sorted(code_rooms()))
def test_every_module_is_named_under_its_room(layout, room):
    named = set(layout.get(room, ()))
    unnamed = sorted(code_rooms()[room] - NOT_LISTED - named)
    assert not unnamed, f"README Layout, {room}: modules not named there: {unnamed}"


def test_every_named_module_exists_in_its_room(layout):
    wrong = []
    for name, modules in layout.items():
        if not name.endswith("/"):
            assert not modules, f"README Layout: {name} is a file, yet names modules {modules}"
            continue
        assert (ROOT / name).is_dir(), f"README Layout names a room that does not exist: {name}"
        wrong += [f"{name}{m}" for m in modules if not (ROOT / name / m).is_file()]
    assert not wrong, f"README Layout names modules that do not exist: {wrong}"


def test_every_top_level_file_named_exists(layout):
    missing = [name for name in layout if not name.endswith("/") and not (ROOT / name).is_file()]
    assert not missing, f"README Layout names files that do not exist: {missing}"


def test_a_room_names_each_module_once(layout):
    doubled = {room: sorted({m for m in mods if mods.count(m) > 1}) for room, mods in layout.items()}
    doubled = {room: mods for room, mods in doubled.items() if mods}
    assert not doubled, f"README Layout names a module twice: {doubled}"


def test_the_parser_sees_drift():
    """A module added, removed or moved changes what the checks above compare."""
    block = ("diffprune/family/      diffusion.py (the class)  persist.py\n"
             "                       latents.py  see common/runtime.py\n"
             "params.yaml            the params\n")
    parsed = entries(block)
    assert parsed == {"diffprune/family/": ["diffusion.py", "persist.py", "latents.py"], "params.yaml": []}
    assert entries("flows/  cli.py\n")["flows/"] == ["cli.py"]
