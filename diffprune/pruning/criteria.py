"""The importance criteria: one row each. Everything that names a criterion (params, scoring, pruning,
reports, the sweep) reads this table, so a new criterion is one row here.

A row says whether the criterion needs the score stage's gradient pass, whether it stops at a loss
threshold (Diff-Pruning's thr), whether the pruned weights are re-initialised (the scratch baseline),
and which importance ranks the channels — in the official diffusers path (torch-pruning's) and, for
the gradient criteria, in the code behind the paper's tables (``score.variant: paper``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

VARIANTS = ("diffusers", "paper")  # which official code a gradient criterion follows


def _tp():
    import torch_pruning as tp  # heavy: only when channels are actually ranked

    return tp


def _paper_taylor():
    from diffprune.pruning.paper_taylor import PaperTaylorImportance

    return PaperTaylorImportance()


@dataclass(frozen=True)
class Criterion:
    name: str
    needs_gradients: bool
    uses_threshold: bool
    reinit: bool
    importance: Callable[[], Any]
    description: str
    paper_importance: Callable[[], Any] | None = None  # the ddpm_exp score, where it differs

    def ranker(self, variant: str = "diffusers") -> Any:
        """The channel scorer of ``variant`` (criteria without a paper score rank alike in both)."""
        return self.paper_importance() if variant == "paper" and self.paper_importance else self.importance()

    def label(self, thr: float | None = None, variant: str | None = None) -> str:
        """The method's name in tables and branch names: the threshold and the paper variant show only
        where they matter."""
        name = f"{self.name}-paper" if variant == "paper" and self.needs_gradients else self.name
        return f"{name}-thr{thr:g}" if self.uses_threshold and thr is not None else name


CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("diff-pruning", True, True, False, lambda: _tp().importance.TaylorImportance(multivariable=False),
              "Σ|w·∇w| per channel over the informative timesteps (loss above thr × max)", _paper_taylor),
    Criterion("taylor", True, False, False, lambda: _tp().importance.TaylorImportance(multivariable=True),
              "|Σ w·∇w| per channel over all T timesteps", _paper_taylor),
    Criterion("magnitude", False, False, False, lambda: _tp().importance.MagnitudeImportance(p=2),
              "L2 norm of each channel's weights"),
    Criterion("random", False, False, False, lambda: _tp().importance.RandomImportance(),
              "random channels"),
    Criterion("reinit", False, False, True, lambda: _tp().importance.RandomImportance(),
              "random channels, then fresh weights (training the pruned architecture from scratch)"),
)}
NAMES: tuple[str, ...] = tuple(CRITERIA)


def criterion(name: str) -> Criterion:
    return CRITERIA[name]


def method_label(name: str, thr: float | None = None, variant: str | None = None) -> str:
    """``diff-pruning-thr0.05``, ``diff-pruning-paper-thr0.05``, ``taylor``…: the one way a method is named."""
    return CRITERIA[name].label(thr, variant) if name in CRITERIA else name
