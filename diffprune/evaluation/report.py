"""The run report: teacher vs pruned model in one markdown page, and the flat summary the registry tags.

Built from the stages' own summaries (``metrics/<stage>.json``), so every front end — the Prefect
flow, ``dvc repro`` with ``diffprune register``, the sweep — reports the same numbers.
"""

from __future__ import annotations

from diffprune.pipeline.table import HEADLINE
from diffprune.pruning.criteria import method_label


def headline(summaries: dict[str, dict]) -> dict:
    """Flat numbers of one pruned model from its stages' summaries (``{stage: metrics/<stage>.json}``):
    what registry tags, comparison tables and the CLI print."""
    teacher, score, prune, finetune, evaluate = (summaries[s] for s in HEADLINE)  # the table's headline stages
    t, p = evaluate["teacher"], evaluate["pruned"]
    return {
        "teacher": teacher.get("pretrained") or teacher.get("source"),
        "criterion": prune.get("criterion"),
        "method": method_label(prune.get("criterion"), score.get("thr"), score.get("variant")),
        "thr": score.get("thr"),
        "variant": score.get("variant"),
        "score_batch": score.get("batch_size"),
        "timesteps_visited": score.get("timesteps_visited"),
        "score_seconds": score.get("seconds"),
        "pruning_ratio": prune.get("pruning_ratio"),
        "target_macs": prune.get("target_macs"),
        "finetune_steps": finetune.get("steps"),
        "finetune_seconds": finetune.get("train_seconds"),
        "teacher_params": t["params"], "params": p["params"],
        "teacher_macs": t["macs"], "macs": p["macs"],
        "macs_ratio": evaluate["macs_ratio"], "params_ratio": evaluate["params_ratio"],
        "teacher_fid": t["fid"], "teacher_fid_std": t["fid_std"],
        "fid": p["fid"], "fid_std": p["fid_std"], "fid_ratio": evaluate.get("fid_ratio"),
        "ssim": p["ssim"], "speedup": evaluate["speedup"],
        "fid_extractor": evaluate["fid_extractor"], "sampler": evaluate["sampler"],
        "sampler_steps": evaluate["sampler_steps"], "n_samples": evaluate["n_samples"],
        "seeds": len(evaluate["seeds"]), "fid_real_floor": evaluate.get("fid_real_floor"),
        "family": evaluate.get("family", "pixel-unconditional"), "guidance_scale": evaluate.get("guidance_scale"),
        "pipeline_speedup": evaluate.get("pipeline_speedup"),
        "teacher_accuracy": t.get("accuracy"), "accuracy": p.get("accuracy"),
        "teacher_clip_score": t.get("clip_score"), "clip_score": p.get("clip_score"),
    }


def branch_method(criterion: str, thr: float | None, variant: str | None = None, n_batches: int = 1) -> str:
    """A sweep branch's method: the criterion with the settings that vary (the paper variant, a threshold,
    several scoring batches)."""
    return method_label(criterion, thr, variant) + (f"-x{n_batches}" if n_batches != 1 else "")


def branch_label(criterion: str, thr: float | None, target_macs: float, seed: int, variant: str | None = None,
                 n_batches: int = 1) -> str:
    """A sweep branch's name: the method, its MACs target and seed."""
    return f"{branch_method(criterion, thr, variant, n_batches)}-macs{target_macs:g}-seed{seed}"


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}"


def render(h: dict, title: str = "diffprune run", links: dict[str, str] | None = None) -> str:
    """Markdown (no indentation: Prefect renders indented lines as code)."""
    target = f"ratio {_num(h['pruning_ratio'], 3)}" if h.get("target_macs") is None else (
        f"MACs target {_num(h['target_macs'], 2)} (ratio {_num(h['pruning_ratio'], 3)})")
    visited = _num(h["timesteps_visited"]) if h.get("timesteps_visited") else "–"
    method = h.get("method") or method_label(h["criterion"], h.get("thr"))
    lines = [
        f"# {title}",
        "",
        f"Teacher `{h['teacher']}`, pruned with **{method}** at {target}, "
        f"fine-tuned {_num(h['finetune_steps'])} steps.",
        "",
        "| | params | MACs | FID | SSIM to teacher | latency speed-up |",
        "|---|---:|---:|---:|---:|---:|",
        f"| teacher | {_num(h['teacher_params'])} | {h['teacher_macs'] / 1e6:.2f} M | "
        f"{_num(h['teacher_fid'])} ± {_num(h['teacher_fid_std'])} | 1 | 1.00× |",
        f"| pruned | {_num(h['params'])} | {h['macs'] / 1e6:.2f} M | {_num(h['fid'])} ± {_num(h['fid_std'])} | "
        f"{_num(h['ssim'])} | {_num(h['speedup'], 2)}× |",
        f"| ratio | {_num(h['params_ratio'])} | {_num(h['macs_ratio'])} | {_num(h['fid_ratio'])} | | "
        f"ideal {1 / h['macs_ratio']:.2f}× |",
        "",
        f"- FID: {h['fid_extractor']} features, {h['sampler']}-{h['sampler_steps']}, {h['seeds']} seeds × "
        f"{h['n_samples']} images (real-data floor {_num(h.get('fid_real_floor'))}).",
        f"- Importance scoring visited {visited} timesteps in {_num(h.get('score_seconds'), 1)} s; "
        f"fine-tuning took {_num(h.get('finetune_seconds'), 1)} s.",
    ]
    if h.get("family", "pixel-unconditional") != "pixel-unconditional":
        guided = f", guidance scale {_num(h.get('guidance_scale'), 1)}" if h.get("guidance_scale") is not None else ""
        lines.append(f"- Model family {h['family']}{guided}; whole-pipeline speed-up (denoising steps + decoding) "
                     f"{_num(h.get('pipeline_speedup'), 2)}×.")
    for metric, label in (("accuracy", "conditional accuracy"), ("clip_score", "CLIP score")):
        if h.get(metric) is not None:
            lines.append(f"- {label}: teacher {_num(h.get(f'teacher_{metric}'))}, pruned {_num(h[metric])}.")
    for name, where in (links or {}).items():
        lines.append(f"- {name}: {where}")
    return "\n".join(lines) + "\n"


def comparison(rows: list[dict]) -> str:
    """A paper-style table over several pruned models (the sweep flow's result)."""
    lines = ["| method | MACs target | params | MACs | FID | SSIM | steps | score s | fine-tune s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        method = r.get("method") or method_label(r["criterion"], r.get("thr"))
        if r.get("seed") is not None:
            method += f", seed {r['seed']}"
        lines.append(
            f"| {method} | {_num(r.get('target_macs'), 2)} | {r['params'] / 1e6:.3f} M | {r['macs'] / 1e6:.2f} M | "
            f"{_num(r['fid'])} ± {_num(r['fid_std'])} | {_num(r['ssim'])} | {_num(r['finetune_steps'])} | "
            f"{_num(r.get('score_seconds'), 1)} | {_num(r.get('finetune_seconds'), 1)} |")
    return "\n".join(lines) + "\n"
