"""Files generated from code (``params.yaml``, ``dvc.yaml``): write them, or check that they are current."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from diffprune.common.atomic import atomic_file


def generator_main(module: str, description: str, default: str, source: str, render: Callable[..., str],
                   argv: list[str] | None = None,
                   configure: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """``python -m <module> [--file F] [--check]``: write ``render()`` atomically, or exit 1 when F differs.
    ``configure`` adds options; ``render`` then receives the parsed arguments."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--file", default=default, help="the generated file (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if the file differs from {source}")
    if configure is not None:
        configure(parser)
    args = parser.parse_args(argv)
    text, path = (render(args) if configure is not None else render()), Path(args.file)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path}: out of date with {source}; run `python -m {module}`", file=sys.stderr)
            return 1
        return 0
    with atomic_file(path) as fh:
        fh.write(text)
    print(f"wrote {path}")
    return 0
