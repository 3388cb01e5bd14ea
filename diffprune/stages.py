"""The pipeline stages: validated params + input paths → outputs written atomically.

One function per library stage of :mod:`diffprune.stage_table`, with its contract: keyword arguments
named as the table's inputs, ``out`` (written atomically), ``metrics`` (``<stage>.json``, the summary
returned) and, for training stages, ``checkpoints``. The CLI (what ``dvc.yaml`` runs) and the Prefect
tasks call these same functions; nothing here knows about orchestration or tracking.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diffprune.atomic import atomic_dir, atomic_file, write_json
from diffprune.config import DataParams, EvaluateParams, FinetuneParams, PruneParams, ScoreParams, TeacherParams
from diffprune.criteria import criterion as criterion_row
from diffprune.data import load_prepared, prepare_dataset
from diffprune.devices import resolve_device
from diffprune.errors import DiffpruneError
from diffprune.evaluation import evaluate_pair
from diffprune.importance import accumulate_gradients
from diffprune.macs import macs_and_params
from diffprune.models import (
    BUILTIN_TEACHER,
    build_unet,
    count_params,
    load_model,
    load_pretrained,
    make_scheduler,
    model_hash,
    save_model,
)
from diffprune.pruning import layer_widths, prune_to_macs, prune_unet, reinitialise
from diffprune.scores import read_scores, write_loss_over_t
from diffprune.tensors import images_to_tensor
from diffprune.training import is_main_process, train, write_loss_history

PathLike = str | Path


def prepare(params: DataParams, *, out: PathLike, metrics: PathLike) -> dict:
    """Prepare the dataset named in ``params`` into ``out``; the summary is its manifest without checksums."""
    manifest = prepare_dataset(params, out)
    info = {k: v for k, v in manifest.items() if k != "files"}
    write_json(Path(metrics) / "prepare.json", info)
    return info


def teacher(params: TeacherParams, *, data: PathLike, out: PathLike, checkpoints: PathLike, metrics: PathLike) -> dict:
    """Provide the model to prune: the shipped teacher, a pretrained one, or one trained from scratch."""
    prepared = load_prepared(data)
    info: dict = {"source": params.source}
    start = time.perf_counter()
    if params.source == "scratch":
        torch.manual_seed(params.train.seed)
        unet = build_unet(params.architecture, prepared.resolution, prepared.channels)
        scheduler = make_scheduler(params.num_train_timesteps)
        result = train(unet, scheduler, prepared.train, params.train, checkpoints)
        unet = result.model
        info.update(steps=result.steps, train_seconds=round(result.seconds, 1), world_size=result.world_size,
                    final_loss=result.final_loss)
        if is_main_process():
            write_loss_history(result.losses, Path(metrics) / "teacher_loss.csv")
    else:
        ref = str(BUILTIN_TEACHER) if params.source == "builtin" else str(params.pretrained)
        unet, scheduler = load_pretrained(ref)
        info["pretrained"] = "builtin:teacher-digits16" if params.source == "builtin" else ref
        _check_fits(unet, prepared.resolution, prepared.channels, ref)
    info.update(params=count_params(unet), seconds=round(time.perf_counter() - start, 1))
    if is_main_process():
        Path(checkpoints).mkdir(parents=True, exist_ok=True)  # a declared DVC output, even when nothing trained
        save_model(unet, scheduler, out)
        write_json(Path(metrics) / "teacher.json", info)
    return info


def _check_fits(unet, resolution: int, channels: int, ref: str) -> None:
    cfg = unet.config
    if cfg.in_channels != channels or (cfg.sample_size and cfg.sample_size != resolution):
        raise DiffpruneError(
            f"teacher {ref}: expects {cfg.in_channels}-channel {cfg.sample_size}px images but the prepared "
            f"data is {channels}-channel {resolution}px; set data.resolution / data.channels to match"
        )


def finetune(params: FinetuneParams, *, data: PathLike, student: PathLike, teacher: PathLike, out: PathLike,
             checkpoints: PathLike, metrics: PathLike) -> dict:
    """Fine-tune the student on the prepared data (distilled from the teacher when ``params.distill``)."""
    prepared = load_prepared(data)
    unet, scheduler = load_model(student)
    _check_fits(unet, prepared.resolution, prepared.channels, str(student))
    teacher_unet = load_model(teacher)[0] if params.distill else None
    result = train(unet, scheduler, prepared.train, params, checkpoints, teacher=teacher_unet,
                   distill_weight=params.distill_weight if params.distill else 0.0)
    info = {"steps": result.steps, "train_seconds": round(result.seconds, 1), "resumed_from": result.resumed_from,
            "world_size": result.world_size, "final_loss": result.final_loss, "distill": params.distill,
            "params": count_params(result.model)}
    if is_main_process():
        save_model(result.model, scheduler, out)
        write_loss_history(result.losses, Path(metrics) / "finetune_loss.csv")
        write_json(Path(metrics) / "finetune.json", info)
    return info


def evaluate(params: EvaluateParams, *, data: PathLike, teacher: PathLike, student: PathLike, out: PathLike,
             metrics: PathLike) -> dict:
    """Sample teacher and student from the same noise into ``out``; FID (per seed), SSIM, MACs, params, latency."""
    prepared = load_prepared(data)
    teacher_model, student_model = load_model(teacher), load_model(student)
    for unet, where in ((teacher_model[0], teacher), (student_model[0], student)):
        _check_fits(unet, prepared.resolution, prepared.channels, str(where))
    start = time.perf_counter()
    result = evaluate_pair(prepared, teacher_model, student_model, params, Path(out))
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["teacher"]["path"], result["pruned"]["path"] = str(teacher), str(student)
    write_json(Path(metrics) / "evaluate.json", result)
    _write_fid_vs_macs(result, Path(metrics) / "evaluate_fid_vs_macs.csv")
    return result


def _write_fid_vs_macs(result: dict, path: Path) -> None:
    """The points of the FID-vs-MACs plot (``dvc plots``); one row per model."""
    with atomic_file(path) as fh:
        fh.write("model,macs_m,fid,fid_std\n")
        for name in ("teacher", "pruned"):
            r = result[name]
            fh.write(f"{name},{r['macs'] / 1e6:.4f},{r['fid']:.6f},{r['fid_std']:.6f}\n")


def score(params: ScoreParams, *, data: PathLike, teacher: PathLike, out: PathLike, metrics: PathLike) -> dict:
    """Accumulate the gradients that rank channels (diff-pruning: informative timesteps only)."""
    prepared = load_prepared(data)
    unet, scheduler = load_model(teacher)
    need = params.batch_size * params.n_batches
    if need > len(prepared.train):
        raise DiffpruneError(
            f"score: batch_size × n_batches = {need} exceeds the {len(prepared.train)} training images")
    row = criterion_row(params.criterion)
    info = {"criterion": params.criterion, "thr": params.thr if row.uses_threshold else None,
            "batch_size": params.batch_size, "n_batches": params.n_batches, "seed": params.seed,
            "teacher": model_hash(unet)}
    with atomic_dir(out) as tmp:
        if row.needs_gradients:
            order = np.random.default_rng(params.seed).permutation(len(prepared.train))[:need]
            x0 = images_to_tensor(prepared.train[order])
            result = accumulate_gradients(unet, scheduler, list(x0.split(params.batch_size)), params.criterion,
                                          params.thr, params.seed, resolve_device(params.device))
            save_file({k: v.contiguous().cpu() for k, v in result.grads.items()}, tmp / "gradients.safetensors")
            write_loss_over_t(result.timesteps, result.losses, tmp / "loss_over_t.csv")
            _write_layer_importance(unet, result.grads, tmp / "importance.csv")
            info.update(timesteps_visited=len(result.timesteps), last_timestep=result.timesteps[-1],
                        loss_first=result.losses[0], loss_last=result.losses[-1], loss_max=max(result.losses),
                        seconds=round(result.seconds, 1), seconds_per_timestep=result.seconds / len(result.timesteps))
        else:
            info.update(timesteps_visited=0, seconds=0.0)
        write_json(tmp / "score.json", info)
    write_json(Path(metrics) / "score.json", info)
    return info


def _write_layer_importance(unet, grads: dict, path: Path) -> None:
    """First-order Taylor importance Σ|w·∂L/∂w| of each layer's weights: where the score mass lies."""
    weights = dict(unet.named_parameters())
    with atomic_file(path) as fh:
        fh.write("layer,importance\n")
        for name, grad in grads.items():
            if name.endswith(".weight") and name in weights and grad.dim() > 1:
                value = (weights[name].detach().cpu() * grad.cpu()).abs().sum().item()
                fh.write(f"{name.removesuffix('.weight')},{value:.6g}\n")


def prune(params: PruneParams, *, teacher: PathLike, scores: PathLike, out: PathLike, metrics: PathLike) -> dict:
    """Remove the lowest-ranked channels (paper semantics) at a ratio or a MACs target; save pickle-free."""
    unet, scheduler = load_model(teacher)
    ranked = read_scores(scores, model_hash(unet))
    criterion = ranked["criterion"]
    grads = ranked.get("gradients")
    before_macs, before_params = macs_and_params(unet)
    start = time.perf_counter()
    if params.target_macs is not None:
        unet, ratio = prune_to_macs(unet, params.target_macs, criterion, grads, params.seed)
    else:
        ratio = params.pruning_ratio
        unet = prune_unet(unet, ratio, criterion, grads, params.seed)
    reinit = params.reinit or criterion_row(criterion).reinit
    if reinit:
        reinitialise(unet, params.seed)
    seconds = time.perf_counter() - start
    macs, n_params = macs_and_params(unet)
    info = {"criterion": criterion, "pruning_ratio": ratio, "target_macs": params.target_macs, "reinit": reinit,
            "teacher": {"macs": before_macs, "params": before_params},
            "pruned": {"macs": macs, "params": n_params},
            "macs_ratio": macs / before_macs, "params_ratio": n_params / before_params,
            "seconds": round(seconds, 2), "widths": layer_widths(unet)}
    save_model(unet, scheduler, out)
    write_json(Path(metrics) / "prune.json", info)
    return info
