"""diffprune: structural pruning of diffusion models (Diff-Pruning) as a reproducible pipeline."""

__version__ = "0.1.0"
