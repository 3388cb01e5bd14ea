"""Where the shipped teachers live (a module without torch, so that cache checks can find them cheaply)."""

from pathlib import Path

ASSETS = Path(__file__).parents[1] / "assets"  # the shipped teachers, one folder each
BUILTIN_TEACHER = ASSETS / "teacher-digits16"
