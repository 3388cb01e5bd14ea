"""A comparison that can rank methods: FID per method over seeds, and Diff-Pruning against each other
method paired by seed (the branches of one seed share the scoring batch and noise and the pruning and
fine-tuning seeds, so seed-to-seed noise that hits every method alike cancels in the difference).

For a pair, d_s = FID(diff-pruning, seed s) − FID(other, seed s) over the seeds both finished; reported:
the mean of d, its 95 % interval mean ± t(0.975, n−1)·sd/√n (Student's t: few seeds), and how many seeds
Diff-Pruning won (lower FID). The data show a difference only where the interval excludes 0. Where they do
not, ``seeds_needed`` says how many paired seeds a paired t-test would need to detect the observed gap with
80 % power at the observed spread — whether more seeds are worth running or the gap is below what they
can resolve.

Many pairs are tested at once (12 for four methods in three Diff-Pruning flavours), so one interval in
twenty excludes 0 by chance alone: each pair also carries its two-sided p-value and the Holm-adjusted one
over all pairs of the table, and a difference that does not survive the adjustment is said so.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy import stats

REFERENCE = "diff-pruning"  # the method family compared against every other one


def per_method(rows: list[dict]) -> dict[tuple[str, float], dict[int, float]]:
    """FID by seed for each (method, MACs target) of finished branch rows."""
    out: dict[tuple[str, float], dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r.get("fid") is not None and "error" not in r:
            out[(r["method"], r["target_macs"])][r["seed"]] = r["fid"]
    return dict(out)


def methods_table(rows: list[dict]) -> list[dict]:
    """Mean FID, its sample standard deviation and the seed count of every method."""
    table = []
    for (method, target), fids in sorted(per_method(rows).items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        values = np.array(list(fids.values()))
        table.append({"method": method, "target_macs": target, "seeds": len(values), "fid": float(values.mean()),
                      "fid_sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan")})
    return table


def paired(rows: list[dict], reference: str = REFERENCE) -> list[dict]:
    """Every method of the ``reference`` family against every other method at the same MACs target (each pair once)."""
    fids, out = per_method(rows), []
    for (ref, target), ref_fid in sorted(fids.items()):
        if not ref.startswith(reference):
            continue
        for (other, other_target), other_fid in sorted(fids.items()):
            if other_target != target or other == ref or (other.startswith(reference) and other < ref):
                continue  # two variants of the reference family are compared once, not in both directions
            seeds = sorted(set(ref_fid) & set(other_fid))
            d = np.array([ref_fid[s] - other_fid[s] for s in seeds])
            out.append({"method": ref, "versus": other, "target_macs": target, "seeds": len(seeds),
                        **difference(d)})
    for p, adjusted in zip(out, holm([p["p"] for p in out]), strict=True):
        p["p_holm"] = adjusted
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error) of p-values; NaN (no test) stays NaN and is not counted."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        out[i] = running
    return out


def difference(d: np.ndarray) -> dict:
    """Mean of paired differences, its 95 % t-interval, wins (d < 0) and the verdict."""
    n = len(d)
    if n < 2:
        return {"mean": float(d.mean()) if n else float("nan"), "low": float("nan"), "high": float("nan"),
                "p": float("nan"), "wins": int((d < 0).sum()), "verdict": "too few seeds"}
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    low, high = mean - half, mean + half
    verdict = "lower FID" if high < 0 else "higher FID" if low > 0 else "no difference shown"
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return {"mean": mean, "low": low, "high": high, "wins": int((d < 0).sum()), "verdict": verdict, "p": p,
            "seeds_needed": seeds_needed(mean, sd)}


def seeds_needed(mean: float, sd: float, power: float = 0.8, most: int = 1000) -> int | None:
    """Fewest paired seeds for a two-sided 5 % paired t-test to detect ``mean`` at spread ``sd`` with ``power``
    (noncentral t, no normal approximation: few seeds); None beyond ``most``."""
    if sd == 0:
        return 2
    effect = abs(mean) / sd
    for n in range(2, most + 1):
        df, crit = n - 1, stats.t.ppf(0.975, n - 1)
        nc = effect * math.sqrt(n)
        if stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc) >= power:
            return n
    return None


def sentence(p: dict) -> str:
    """One sentence per pair: what the data show."""
    if p["verdict"] == "too few seeds":
        return f"{p['method']} vs {p['versus']}: fewer than 2 paired seeds, no statement possible."
    ci = f"mean paired difference {p['mean']:+.3f}, 95 % interval [{p['low']:+.3f}, {p['high']:+.3f}]"
    if p["verdict"] == "no difference shown":
        return (f"{p['method']} vs {p['versus']}: the data show no difference over {p['seeds']} paired seeds "
                f"({ci}; won {p['wins']} of {p['seeds']}).")
    holm_note = "" if p.get("p_holm", 0.0) < 0.05 else (
        f"; not after Holm's adjustment for the table's comparisons, p = {p['p_holm']:.2f}")
    return (f"{p['method']} vs {p['versus']}: {p['method']} has {p['verdict']} over {p['seeds']} paired seeds "
            f"({ci}; won {p['wins']} of {p['seeds']}{holm_note}).")


def render(rows: list[dict], reference: str = REFERENCE) -> str:
    """The methods table, the paired table and one sentence per pair (markdown)."""
    lines = ["| method | MACs target | seeds | FID mean | FID sd |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {t['method']} | {t['target_macs']:g} | {t['seeds']} | {t['fid']:.3f} | {_num(t['fid_sd'])} |"
              for t in methods_table(rows)]
    lines += ["", *per_seed_table(rows)]
    pairs = paired(rows, reference)
    if pairs:
        lines += ["", "| method | vs | MACs target | paired seeds | mean difference | 95 % interval | won | p "
                  "| p (Holm) | verdict | seeds for 80 % power |",
                  "|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|"]
        lines += [f"| {p['method']} | {p['versus']} | {p['target_macs']:g} | {p['seeds']} | {_num(p['mean'], '+')} | "
                  f"{_interval(p)} | {p['wins']}/{p['seeds']} | {_num(p['p'])} | {_num(p['p_holm'])} | "
                  f"{p['verdict']} | {_needed(p)} |" for p in pairs]
        lines += [""] + [f"- {sentence(p)}" for p in pairs]
    return "\n".join(lines) + "\n"


def per_seed_table(rows: list[dict]) -> list[str]:
    """FID of every method (rows) on every seed (columns), markdown lines: the pairing made visible."""
    fids = per_method(rows)
    seeds = sorted({s for by_seed in fids.values() for s in by_seed})
    lines = ["| method | MACs target | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---:|" + "---:|" * len(seeds)]
    for (method, target), by_seed in sorted(fids.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        cells = " | ".join(f"{by_seed[s]:.3f}" if s in by_seed else "–" for s in seeds)
        lines.append(f"| {method} | {target:g} | {cells} |")
    return lines


def _needed(p: dict) -> str:
    n = p.get("seeds_needed")
    return "–" if p["verdict"] == "too few seeds" else "> 1000" if n is None else str(n)


def _num(x: float, sign: str = "") -> str:
    return "–" if math.isnan(x) else f"{x:{sign}.3f}"


def _interval(p: dict) -> str:
    return "–" if math.isnan(p["low"]) else f"[{p['low']:+.3f}, {p['high']:+.3f}]"
