"""The promotion gate of registered models, and their version tags; pure logic, no MLflow.

A candidate becomes champion only if it is good enough on its own (FID ratio, MACs ratio against
the teacher of the same evaluation) and not clearly worse than the current champion. Ratios are
compared rather than raw FIDs because FIDs from different extractors or sample counts share no scale.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from diffprune.pipeline.stage_params import RegisterParams

# Only these keys become tags: a summary may hold more (paths, per-seed lists) than a tag should carry.
TAG_KEYS = (
    "criterion", "thr", "variant", "pruning_ratio", "target_macs", "macs", "macs_ratio", "params", "fid", "fid_std",
    "fid_ratio", "teacher_fid", "ssim", "speedup", "teacher", "fid_extractor", "sampler_steps", "n_samples",
    "family", "guidance_scale", "pipeline_speedup", "accuracy", "teacher_accuracy", "clip_score", "branch",
)


@dataclass(frozen=True)
class GateResult:
    """Whether the candidate may become champion, with one line per check."""

    passed: bool
    reasons: list[str]


def _number(values: dict | None, key: str) -> float | None:
    """A finite float, or None when missing or unusable; registry tags arrive as strings."""
    raw = (values or {}).get(key)
    if raw is None or isinstance(raw, bool):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _bound_check(name: str, value: float | None, limit: float, label: str) -> tuple[bool, str]:
    if value is None:
        return False, f"fail: candidate {name} is missing or not a number"
    ok = value <= limit
    return ok, f"{'pass' if ok else 'fail'}: {name} {value:.4g} {'<=' if ok else '>'} {label} {limit:.4g}"


def gate(candidate: dict, champion: dict | None, params: RegisterParams) -> GateResult:
    """Run every check (never stopping at the first failure) so the reasons explain the whole decision."""
    fid_ratio = _number(candidate, "fid_ratio")
    checks = [
        _bound_check("fid_ratio", fid_ratio, params.max_fid_ratio, "max_fid_ratio"),
        _bound_check("macs_ratio", _number(candidate, "macs_ratio"), params.max_macs_ratio, "max_macs_ratio"),
    ]
    if champion is None:
        checks.append((True, "pass: no champion yet"))
    else:
        best = _number(champion, "fid_ratio")
        if best is None:
            # Refuse rather than guess: a champion without a usable FID ratio was not promoted by this gate.
            checks.append((False, "fail: champion fid_ratio is missing or not a number; cannot compare"))
        elif fid_ratio is None:
            checks.append((False, "fail: candidate fid_ratio is missing; cannot compare with the champion"))
        else:
            limit = best * (1 + params.champion_margin)
            ok = fid_ratio <= limit
            checks.append((ok, f"{'pass' if ok else 'fail'}: fid_ratio {fid_ratio:.4g} {'<=' if ok else '>'} "
                               f"champion's {best:.4g} × (1 + {params.champion_margin:g}) = {limit:.4g}"))
    return GateResult(passed=all(ok for ok, _ in checks), reasons=[reason for _, reason in checks])


def _format(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.6g}"
    return str(value)


def version_tags(summary: dict) -> dict[str, str]:
    """MLflow model-version tags (strings only) from an evaluation summary; None values are left out."""
    return {key: _format(summary[key]) for key in TAG_KEYS if summary.get(key) is not None}
