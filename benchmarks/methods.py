r"""Method comparison through the sweep flow: scratch training (reinit), random, magnitude, Taylor and
Diff-Pruning at several thresholds, at two MACs targets, the same fine-tuning budget, several seeds —
branches paired by seed — plus Diff-Pruning against each other method paired by seed (diffprune.evaluation.paired).

    # the paired comparison (docs/results.md §5.1: the exact per-seed commands, run seed-major, resumably)
    python benchmarks/methods.py --criteria diff-pruning taylor magnitude random --thresholds 0.05 \
        --targets 0.6 --seeds 0 1 2 3 4 --set orchestration.store=artifacts/paired/store
    python benchmarks/methods.py --criteria diff-pruning --variants paper ...      # the paper's score
    python benchmarks/methods.py --criteria diff-pruning --score-batches 4 ...     # 4 × 32 scoring images
    python benchmarks/methods.py --from-store artifacts/paired/store --out benchmarks/results/paired

    python benchmarks/methods.py                      # the default params.yaml; ~4 h on 2 CPU cores
    python benchmarks/methods.py --workers 12 --set tracking.enabled=false   # the committed results: one H200,
                                                                              # 6.5 min (12 stages share the GPU)
    python benchmarks/methods.py --from-store artifacts/store   # tables from finished branches only

Writes benchmarks/results/methods.{json,md}, methods_pareto.png (FID vs MACs) and, with several seeds,
methods_seeds.png (FID per seed and method). ``--from-store`` reads
the stage manifests of every evaluated branch in a store (e.g. of a sweep stopped at a time limit).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, mean_std, save
from diffprune.evaluation import paired
from diffprune.flows.cli import prepare_environment
from diffprune.pipeline.config import load_params
from diffprune.pruning.criteria import method_label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--criteria", nargs="+", default=["reinit", "random", "magnitude", "taylor", "diff-pruning"])
    ap.add_argument("--thresholds", nargs="+", type=float, default=[0.0, 0.02, 0.05])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.6, 0.35], help="fractions of the teacher's MACs")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=["diffusers"], help="score variants of the gradient criteria")
    ap.add_argument("--score-batches", nargs="+", type=int, default=[1],
                    help="score.n_batches values of the gradient criteria")
    ap.add_argument("--workers", type=int, default=2, help="stages running at once (each its own process)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--from-store", type=Path, help="aggregate the evaluated branches of this store; run nothing")
    args = ap.parse_args()
    if args.from_store:
        rows, left_out = rows_from_store(args.from_store)
        publish(rows, load_params(args.params, args.overrides).finetune.steps,
                {"from_store": str(args.from_store), "overrides": args.overrides, "left_out": left_out}, args.out)
        return

    overrides = [f"sweep.criteria=[{','.join(args.criteria)}]",
                 f"sweep.thresholds=[{','.join(map(str, args.thresholds))}]",
                 f"sweep.target_macs=[{','.join(map(str, args.targets))}]",
                 f"sweep.seeds=[{','.join(map(str, args.seeds))}]",
                 f"sweep.variants=[{','.join(args.variants)}]",
                 f"sweep.score_batches=[{','.join(map(str, args.score_batches))}]",
                 f"orchestration.max_workers={args.workers}", *args.overrides]
    params = load_params(args.params, overrides)
    prepare_environment(params.orchestration.store)
    from diffprune.flows.sweep import sweep

    result = sweep(args.params, overrides)
    publish(result["rows"], params.finetune.steps, {"overrides": overrides}, args.out)


def publish(rows: list[dict], steps: int, how: dict, out: Path) -> None:
    table = aggregate([r for r in rows if "error" not in r], steps)
    markdown = render(table, rows, how.get("left_out", []))
    print(markdown)
    save("methods", {"rows": rows, "table": table, **how}, markdown, out)
    pareto(table, out / "methods_pareto.png")
    seeds_plot([r for r in rows if "error" not in r and r.get("method")], out / "methods_seeds.png")


def rows_from_store(root: Path) -> tuple[list[dict], list[dict]]:
    """One row per evaluated branch, from the stage manifests alone (no weights needed), and the rows left
    out. Walks forward from each score entry by output digest: two branches whose pruned models came out
    identical share one fine-tuning entry, which records only the first branch as its input; two score
    entries of one branch with the same output lead to the same evaluation and give one row. A branch
    computed under several code versions keeps one row (see ``one_per_branch``)."""
    from diffprune.evaluation.report import branch_label, branch_method, headline
    from diffprune.pipeline.table import HEADLINE as HEADLINE_STAGES

    entries = {stage: {m["key"]: m for m in (json.loads(p.read_text()) for p in root.glob(f"{stage}/*/manifest.json"))}
               for stage in HEADLINE_STAGES}

    def after(stage: str, upstream: dict, name: str, up_stage: str) -> list[dict]:
        return [m for m in entries[stage].values()
                if entries[up_stage][m["inputs"][name]]["output_digest"] == upstream["output_digest"]]

    rows, seen = [], set()
    for score in entries["score"].values():
        for prune in after("prune", score, "scores", "score"):
            seed = prune["params"]["seed"]
            for tuned in (m for m in after("finetune", prune, "student", "prune") if m["params"]["seed"] == seed):
                for evaluation in after("evaluate", tuned, "student", "finetune"):
                    teacher = entries["teacher"][prune["inputs"]["teacher"]]
                    chain = dict(zip(HEADLINE_STAGES, (teacher, score, prune, tuned, evaluation), strict=True))
                    s = {stage: m["summary"] for stage, m in chain.items()}
                    sp = score["params"]
                    shown = sp.get("variant", "diffusers") if s["score"].get("variant") else None
                    branch = {"criterion": sp["criterion"], "thr": sp["thr"], "seed": seed, "variant": shown,
                              "target_macs": prune["params"]["target_macs"], "n_batches": sp.get("n_batches", 1)}
                    label = branch_label(**branch)
                    if (label, evaluation["key"]) in seen:
                        continue
                    seen.add((label, evaluation["key"]))
                    rows.append({**headline(s), **branch, "label": label,
                                 "method": branch_method(sp["criterion"], sp["thr"], shown, branch["n_batches"]),
                                 "code": "/".join(str(m.get("code")) for m in chain.values()),
                                 "created": evaluation.get("created", 0.0)})
    if not rows:
        raise SystemExit(f"{root}: no evaluated branch (no complete score → evaluate chain)")
    return one_per_branch(rows)


def one_per_branch(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """A branch evaluated under several code versions (the stages' code changed between runs into one store)
    keeps the row computed with the code most branches share — a table must compare methods under one
    code — else its newest; the others are returned as left out, to be listed, not silently dropped."""
    code_count = Counter(r["code"] for r in rows)
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    kept, left_out = [], []
    for label in sorted(by_label):
        ranked = sorted(by_label[label], key=lambda r: (code_count[r["code"]], r["created"]), reverse=True)
        kept.append(ranked[0])
        left_out += ranked[1:]
    return kept, left_out


def aggregate(rows: list[dict], steps: int) -> list[dict]:
    """Mean and spread over seeds of each (method, target); the teacher first."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r.get("method") or method_label(r["criterion"], r["thr"]), r["target_macs"])].append(r)
    first = rows[0]
    table = [{"method": "teacher", "target_macs": 1.0, "params": first["teacher_params"], "macs": first["teacher_macs"],
              "fid": first["teacher_fid"], "fid_std": first["teacher_fid_std"], "ssim": 1.0, "ssim_std": 0.0,
              "steps": None, "seeds": 1}]
    for (method, target), rs in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        fid, fid_std = mean_std([r["fid"] for r in rs])
        ssim, ssim_std = mean_std([r["ssim"] for r in rs])
        table.append({
            "method": method, "target_macs": target, "params": rs[0]["params"], "macs": rs[0]["macs"],
            "macs_ratio": rs[0]["macs_ratio"], "fid": fid, "fid_std": fid_std, "ssim": ssim, "ssim_std": ssim_std,
            "fid_per_seed": [r["fid"] for r in rs], "steps": steps, "seeds": len(rs),
            "timesteps_visited": rs[0].get("timesteps_visited"),
            "score_s": mean_std([r.get("score_seconds") or 0.0 for r in rs])[0],
            "finetune_s": mean_std([r.get("finetune_seconds") or 0.0 for r in rs])[0],
        })
    return table


def render(table: list[dict], rows: list[dict], left_out: list[dict] = ()) -> str:
    lines = ["| method | MACs target | params | MACs | FID (mean ± sd over seeds) | FID per seed | SSIM to teacher "
             "| fine-tune steps | timesteps scored | score s | fine-tune s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        visited = t.get("timesteps_visited")
        lines.append(
            f"| {t['method']} | {t['target_macs']:g} | {t['params'] / 1e6:.3f} M | {t['macs'] / 1e6:.2f} M | "
            f"{t['fid']:.3f} ± {t['fid_std']:.3f} | {' / '.join(f'{x:.3f}' for x in t.get('fid_per_seed', []))} | "
            f"{t['ssim']:.3f} ± {t['ssim_std']:.3f} | {t['steps'] or '–'} | "
            f"{visited if visited else '–'} | {_seconds(t.get('score_s'))} | {_seconds(t.get('finetune_s'))} |")
    failed = [r for r in rows if "error" in r]
    lines += [f"- {r['label']}: failed in {r['failed_stage']}: {r['error']}" for r in failed]
    lines += [f"- {r['label']}: an evaluation under other stage code (FID {r['fid']:.3f}, code {r['code']}) left out"
              for r in left_out]
    done = [r for r in rows if "error" not in r and r.get("method")]
    if done:
        lines += ["", "Paired by seed (FID; Diff-Pruning minus the other method):", "", paired.render(done)]
    return "\n".join(lines) + "\n"


def _seconds(x: float | None) -> str:
    return f"{x:.1f}" if x else "–"


def pareto(table: list[dict], path: Path) -> None:
    """FID vs MACs, one colour per method joined across MACs targets; right panel zoomed on the pruned
    methods (scratch training sits far above them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(t["method"] for t in table))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    zooms = (False, True) if "reinit" in methods else (False,)  # nothing to zoom past without scratch training
    fig, axes = plt.subplots(1, len(zooms), figsize=(5 * len(zooms), 4), dpi=130, squeeze=False)
    axes = axes[0]
    for ax, zoom in zip(axes, zooms, strict=True):
        for i, method in enumerate(methods):
            pts = sorted((t for t in table if t["method"] == method), key=lambda t: t["macs"])
            if zoom and method == "reinit":
                continue
            shift = 0.0 if method == "teacher" else 0.25 * (i - len(methods) / 2)  # spread shared MACs values
            xs = [t["macs"] / 1e6 + shift for t in pts]
            ax.errorbar(xs, [t["fid"] for t in pts], yerr=[t["fid_std"] for t in pts], fmt="o-", ms=4, lw=1,
                        capsize=2, color=colours[method], label=method)
        ax.set_xlabel("MACs per denoising call (M)")
        ax.set_title("pruned methods (zoom)" if zoom else "FID vs MACs (mean ± sd over seeds)")
    axes[0].set_ylabel("FID (lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

def seeds_plot(rows: list[dict], path: Path) -> None:
    """FID of every method on every seed, one line per seed across the methods of a MACs target: the
    pairing the paired table tests, made visible (a seed that is hard for every method is a high line,
    not a difference between methods). Written only with two seeds or more."""
    fids = paired.per_method(rows)
    seeds = sorted({s for by_seed in fids.values() for s in by_seed})
    if len(seeds) < 2:
        return
    means = {(t["method"], t["target_macs"]): t["fid"] for t in paired.methods_table(rows)}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({target for _, target in fids}, reverse=True)
    width = max(5.0, 1.1 * max(sum(t == target for _, t in fids) for target in targets))
    fig, axes = plt.subplots(1, len(targets), figsize=(width * len(targets), 4.2), dpi=130, squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        methods = sorted((m for m, t in fids if t == target), key=lambda m: means[(m, target)])
        for i, seed in enumerate(seeds):
            ys = [fids[(m, target)].get(seed, np.nan) for m in methods]
            ax.plot(range(len(methods)), ys, "o-", lw=1, ms=4, color=plt.get_cmap("tab10")(i % 10),
                    label=f"seed {seed}")
        ax.scatter(range(len(methods)), [means[(m, target)] for m in methods], marker="_", s=600, color="black",
                   zorder=3, label="mean")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"FID per seed at {target:g}× MACs (lower is better)", fontsize=9)
    axes[0][0].set_ylabel("FID")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
