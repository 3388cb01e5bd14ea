"""Allows `python -m diffprune` and `accelerate launch -m diffprune`."""

from diffprune.cli import main

raise SystemExit(main())
