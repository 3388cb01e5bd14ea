"""``python -m diffprune.flows``: the same as the ``diffprune`` command."""

from diffprune.flows.cli import main

raise SystemExit(main())
