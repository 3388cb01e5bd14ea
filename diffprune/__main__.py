"""Allows `python -m diffprune` and `accelerate launch -m diffprune`."""

from diffprune.pipeline.cli import main

raise SystemExit(main())
