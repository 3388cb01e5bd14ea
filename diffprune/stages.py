"""The pipeline stages: validated params + input paths → outputs written atomically.

The CLI (what ``dvc.yaml`` runs) and the Prefect tasks call these same functions; nothing here
knows about orchestration or tracking.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffprune import paths
from diffprune.atomic import write_json
from diffprune.config import DataParams, EvaluateParams, FinetuneParams, TeacherParams
from diffprune.data import load_prepared, prepare_dataset
from diffprune.errors import DiffpruneError
from diffprune.evaluation import evaluate_pair
from diffprune.models import (
    BUILTIN_TEACHER,
    build_unet,
    count_params,
    load_model,
    load_pretrained,
    make_scheduler,
    save_model,
)
from diffprune.training import is_main_process, train, write_loss_history


def prepare(params: DataParams, out_dir: str | Path = paths.DATA) -> dict:
    """Prepare the dataset named in ``params`` into ``out_dir``; returns its manifest."""
    return prepare_dataset(params, out_dir)


def teacher(
    params: TeacherParams,
    data_dir: str | Path = paths.DATA,
    out_dir: str | Path = paths.TEACHER,
    ckpt_dir: str | Path = paths.TEACHER_CKPT,
    metrics_dir: str | Path = paths.METRICS,
) -> dict:
    """Provide the model to prune: the shipped teacher, a pretrained one, or one trained from scratch."""
    data = load_prepared(data_dir)
    info: dict = {"source": params.source}
    start = time.perf_counter()
    if params.source == "scratch":
        torch.manual_seed(params.train.seed)
        unet = build_unet(params.architecture, data.resolution, data.channels)
        scheduler = make_scheduler(params.num_train_timesteps)
        result = train(unet, scheduler, data.train, params.train, ckpt_dir)
        unet = result.model
        info.update(steps=result.steps, train_seconds=round(result.seconds, 1), world_size=result.world_size,
                    final_loss=float(sum(result.losses[-50:]) / len(result.losses[-50:])))
        if is_main_process():
            write_loss_history(result.losses, Path(metrics_dir) / "teacher_loss.csv")
    else:
        ref = str(BUILTIN_TEACHER) if params.source == "builtin" else str(params.pretrained)
        unet, scheduler = load_pretrained(ref)
        info["pretrained"] = "builtin:teacher-digits16" if params.source == "builtin" else ref
        _check_fits(unet, data.resolution, data.channels, ref)
    info.update(params=count_params(unet), seconds=round(time.perf_counter() - start, 1))
    if is_main_process():
        save_model(unet, scheduler, out_dir)
        write_json(Path(metrics_dir) / "teacher.json", info)
    return info


def _check_fits(unet, resolution: int, channels: int, ref: str) -> None:
    cfg = unet.config
    if cfg.in_channels != channels or (cfg.sample_size and cfg.sample_size != resolution):
        raise DiffpruneError(
            f"teacher {ref}: expects {cfg.in_channels}-channel {cfg.sample_size}px images but the prepared "
            f"data is {channels}-channel {resolution}px; set data.resolution / data.channels to match"
        )


def finetune(
    params: FinetuneParams,
    data_dir: str | Path = paths.DATA,
    student_dir: str | Path = paths.STUDENT,
    teacher_dir: str | Path = paths.TEACHER,
    out_dir: str | Path = paths.FINETUNED,
    ckpt_dir: str | Path = paths.FINETUNE_CKPT,
    metrics_dir: str | Path = paths.METRICS,
) -> dict:
    """Fine-tune the student on the prepared data (distilled from the teacher when ``params.distill``)."""
    data = load_prepared(data_dir)
    unet, scheduler = load_model(student_dir)
    _check_fits(unet, data.resolution, data.channels, str(student_dir))
    teacher_unet = load_model(teacher_dir)[0] if params.distill else None
    result = train(unet, scheduler, data.train, params, ckpt_dir, teacher=teacher_unet,
                   distill_weight=params.distill_weight if params.distill else 0.0)
    tail = result.losses[-50:]
    info = {"steps": result.steps, "train_seconds": round(result.seconds, 1), "resumed_from": result.resumed_from,
            "world_size": result.world_size, "final_loss": float(sum(tail) / len(tail)), "distill": params.distill,
            "params": count_params(result.model)}
    if is_main_process():
        save_model(result.model, scheduler, out_dir)
        write_loss_history(result.losses, Path(metrics_dir) / "finetune_loss.csv")
        write_json(Path(metrics_dir) / "finetune.json", info)
    return info


def evaluate(
    params: EvaluateParams,
    data_dir: str | Path = paths.DATA,
    teacher_dir: str | Path = paths.TEACHER,
    student_dir: str | Path = paths.FINETUNED,
    samples_dir: str | Path = paths.SAMPLES,
    metrics_dir: str | Path = paths.METRICS,
) -> dict:
    """Sample teacher and student from the same noise; FID (per seed), SSIM, MACs, params, latency."""
    data = load_prepared(data_dir)
    teacher_model, student_model = load_model(teacher_dir), load_model(student_dir)
    for unet, where in ((teacher_model[0], teacher_dir), (student_model[0], student_dir)):
        _check_fits(unet, data.resolution, data.channels, str(where))
    start = time.perf_counter()
    result = evaluate_pair(data, teacher_model, student_model, params, Path(samples_dir))
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["teacher"]["path"], result["pruned"]["path"] = str(teacher_dir), str(student_dir)
    write_json(Path(metrics_dir) / "evaluate.json", result)
    return result
