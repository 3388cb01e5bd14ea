"""The pipeline stages: validated params + input paths → outputs written atomically.

One function per library stage of :mod:`diffprune.pipeline.table`, with its contract: keyword arguments
named as the table's inputs, ``out`` (written atomically), ``metrics`` (``<stage>.json``, the summary
returned) and, for training stages, ``checkpoints``. The CLI (what ``dvc.yaml`` runs) and the Prefect
tasks call these same functions; nothing here knows about orchestration or tracking.

What enters a stage's cache key (:mod:`diffprune.pipeline.fingerprint`): its params by value (less the
fields marked not keyed), its inputs by content, and its code — the source of its function here and of
every function, class or constant of this file it reaches (public or private), the files of every project
module those use (imported at the top or inside a function) and everything they import, the source of
its params models, and the versions of the numeric libraries. A name the key cannot resolve makes the key
computation fail (``UnseenName``), so a stage never runs code its key does not cover.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diffprune.common.atomic import atomic_dir, atomic_file, write_json
from diffprune.common.errors import DiffpruneError
from diffprune.common.runtime import resolve_device
from diffprune.data.datasets import load_prepared, prepare_dataset
from diffprune.evaluation.compare import evaluate_pair
from diffprune.family.diffusion import Diffusion, images_to_tensor
from diffprune.family.hub import UNRESOLVED, resolve_revision
from diffprune.family.latents import training_inputs, write_latents
from diffprune.family.models import (
    ASSETS,
    build_unet,
    count_params,
    load_diffusion,
    load_pretrained,
    make_scheduler,
    model_hash,
    save_diffusion,
)
from diffprune.pipeline.stage_params import (
    DataParams,
    EvaluateParams,
    FinetuneParams,
    PruneParams,
    ScoreParams,
    TeacherParams,
)
from diffprune.pruning.criteria import criterion as criterion_row
from diffprune.pruning.importance import ScoreOptions, accumulate_gradients
from diffprune.pruning.macs import macs_and_params
from diffprune.pruning.scores import read_scores, write_loss_over_t
from diffprune.pruning.structural import layer_widths, prune_to_macs, prune_unet, reinitialise
from diffprune.training.loop import is_main_process, train, write_loss_history
from diffprune.training.options import Conditioning, Distillation

PathLike = str | Path


def prepare(params: DataParams, *, out: PathLike, metrics: PathLike) -> dict:
    """Prepare the dataset named in ``params`` into ``out``; the summary is its manifest without checksums."""
    manifest = prepare_dataset(params, out)
    info = {k: v for k, v in manifest.items() if k != "files"}
    write_json(Path(metrics) / "prepare.json", info)
    return info


def teacher(params: TeacherParams, *, data: PathLike, out: PathLike, checkpoints: PathLike, metrics: PathLike) -> dict:
    """Provide the model to prune: a shipped teacher, a pretrained one, or one trained from scratch.
    For latent models the training set is encoded once, here, and kept with the teacher."""
    prepared = load_prepared(data)
    info: dict = {"source": params.source}
    start = time.perf_counter()
    if params.source == "scratch":
        torch.manual_seed(params.train.seed)
        unet = build_unet(params.architecture, prepared.resolution, prepared.channels)
        scheduler = make_scheduler(params.num_train_timesteps)
        result = train(Diffusion(unet, scheduler), prepared.train, params.train, checkpoints)
        model = Diffusion(result.model, scheduler)
        info.update(steps=result.steps, train_seconds=round(result.seconds, 1), world_size=result.world_size,
                    final_loss=result.final_loss)
        if is_main_process():
            write_loss_history(result.losses, Path(metrics) / "teacher_loss.csv")
    else:
        ref = str(ASSETS / params.builtin) if params.source == "builtin" else str(params.pretrained)
        model = load_pretrained(ref, _hub_commit(ref, params.revision))
        info["pretrained"] = f"builtin:{params.builtin}" if params.source == "builtin" else ref
        _check_fits(model, prepared, ref)
    info.update(family=model.family, params=count_params(model.unet), seconds=round(time.perf_counter() - start, 1))
    if is_main_process():
        Path(checkpoints).mkdir(parents=True, exist_ok=True)  # a declared DVC output, even when nothing trained

        def cache_latents(folder: Path) -> None:
            if model.autoencoder is not None:
                info.update(write_latents(folder, model, prepared, resolve_device(params.train.device)))

        save_diffusion(model, out, extra=cache_latents)
        write_json(Path(metrics) / "teacher.json", info)
    return info


def _hub_commit(ref: str, revision: str | None) -> str | None:
    """The commit a hub teacher's cache key carries (what is loaded, then); a local folder: None."""
    if Path(ref).exists():
        return None
    commit = resolve_revision(ref, revision)
    return revision if commit == UNRESOLVED else commit


def _check_fits(model: Diffusion, prepared, ref: str) -> None:
    """The model generates images of the prepared data's size and channels, and knows its conditions."""
    if model.image_channels != prepared.channels or model.image_size != prepared.resolution:
        raise DiffpruneError(
            f"teacher {ref}: makes {model.image_channels}-channel {model.image_size}px images but the prepared "
            f"data is {prepared.channels}-channel {prepared.resolution}px; set data.resolution / data.channels to match"
        )
    model.conditions(prepared)


def finetune(params: FinetuneParams, *, data: PathLike, student: PathLike, teacher: PathLike, out: PathLike,
             checkpoints: PathLike, metrics: PathLike) -> dict:
    """Fine-tune the student on the prepared data (distilled from the teacher when ``params.distill``)."""
    prepared = load_prepared(data)
    model = load_diffusion(student)
    _check_fits(model, prepared, str(student))
    distillation = Distillation(load_diffusion(teacher), params.distill_weight) if params.distill else None
    conditioning = None
    if model.conditional:  # the label embedding trains too when asked and it can (text encoders never do)
        joint = params.train_label_embedding and model.condition.trainable
        conditioning = Conditioning(model.training_conditions(prepared), params.condition_dropout, joint)
    result = train(model, training_inputs(model, teacher, prepared), params, checkpoints,
                   conditioning=conditioning, distillation=distillation)
    student_model = result.trained(model)
    info = {"steps": result.steps, "train_seconds": round(result.seconds, 1), "resumed_from": result.resumed_from,
            "world_size": result.world_size, "final_loss": result.final_loss, "distill": params.distill,
            "params": count_params(result.model), "family": model.family}
    if is_main_process():
        save_diffusion(student_model, out)
        write_loss_history(result.losses, Path(metrics) / "finetune_loss.csv")
        write_json(Path(metrics) / "finetune.json", info)
    return info


def evaluate(params: EvaluateParams, *, data: PathLike, teacher: PathLike, student: PathLike, out: PathLike,
             metrics: PathLike) -> dict:
    """Sample teacher and student from the same noise (and conditions) into ``out``; FID per seed, SSIM,
    conditional accuracy, MACs, params, latency of the denoiser and of the whole pipeline."""
    prepared = load_prepared(data)
    teacher_model, student_model = load_diffusion(teacher), load_diffusion(student)
    for model, where in ((teacher_model, teacher), (student_model, student)):
        _check_fits(model, prepared, str(where))
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
    model = load_diffusion(teacher)
    unet = model.unet
    need = params.batch_size * params.n_batches
    if need > len(prepared.train):
        raise DiffpruneError(
            f"score: batch_size × n_batches = {need} exceeds the {len(prepared.train)} training images")
    row = criterion_row(params.criterion)
    info = {"criterion": params.criterion, "thr": params.thr if row.uses_threshold else None,
            "variant": params.variant if row.needs_gradients else None,
            "batch_size": params.batch_size, "n_batches": params.n_batches, "timestep_batch": params.timestep_batch,
            "seed": params.seed,
            "teacher": model_hash(unet), "family": model.family}
    with atomic_dir(out) as tmp:
        if row.needs_gradients:
            device = resolve_device(params.device)
            batches, contexts = _score_batches(model, teacher, prepared, params, device)
            options = ScoreOptions(params.criterion, params.thr, params.seed, params.timestep_batch, params.variant)
            result = accumulate_gradients(model, batches, options, contexts=contexts, device=device)
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


def _score_batches(model: Diffusion, teacher: PathLike, prepared, params: ScoreParams, device) -> tuple[list, list]:
    """The fixed batches x0 of the score pass and their contexts (real conditions, and the null one
    when ``include_null``: the same batch scored twice)."""
    order = np.random.default_rng(params.seed).permutation(len(prepared.train))[:params.batch_size * params.n_batches]
    inputs = training_inputs(model, teacher, prepared)
    x0 = images_to_tensor(inputs[order]) if isinstance(inputs, np.ndarray) else inputs[order]
    batches = list(x0.split(params.batch_size))
    if not model.conditional:
        return batches, [None] * len(batches)
    conditions = model.conditions(prepared)
    picked = [conditions[i] for i in order]
    contexts = [model.context(picked[i:i + params.batch_size], device)
                for i in range(0, len(picked), params.batch_size)]
    if params.include_null:
        batches = batches + batches
        contexts = contexts + [model.null_context(len(b), device) for b in batches[:len(contexts)]]
    return batches, contexts


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
    """Remove the lowest-ranked channels (paper semantics) at a ratio or a MACs target; save pickle-free.
    Only the denoiser is pruned; the frozen parts (autoencoder, conditioner) are saved with it."""
    model = load_diffusion(teacher)
    ranked = read_scores(scores, model_hash(model.unet))
    criterion, variant = ranked["criterion"], ranked.get("variant") or "diffusers"
    device = resolve_device(params.device)  # tracing, the MACs search and the pruning run there
    unet = model.unet.to(device)
    grads = {k: v.to(device) for k, v in ranked["gradients"].items()} if ranked.get("gradients") else None
    inputs = model.example_inputs(device=device)
    before_macs, before_params = macs_and_params(unet, inputs)
    start = time.perf_counter()
    if params.target_macs is not None:
        unet, ratio = prune_to_macs(unet, params.target_macs, criterion, grads, params.seed, round_to=params.round_to,
                                    variant=variant, inputs=inputs)
    else:
        ratio = params.pruning_ratio
        unet = prune_unet(unet, ratio, criterion, grads, params.seed, params.round_to, variant)
    unet = unet.cpu()  # re-initialised (seeded), counted and saved on the CPU, whichever device pruned it
    inputs = model.to("cpu").example_inputs()
    reinit = params.reinit or criterion_row(criterion).reinit
    if reinit:
        reinitialise(unet, params.seed)
    seconds = time.perf_counter() - start
    macs, n_params = macs_and_params(unet, inputs)
    info = {"criterion": criterion, "variant": ranked.get("variant"), "pruning_ratio": ratio,
            "target_macs": params.target_macs, "reinit": reinit,
            "round_to": params.round_to, "family": model.family,
            "teacher": {"macs": before_macs, "params": before_params},
            "pruned": {"macs": macs, "params": n_params},
            "macs_ratio": macs / before_macs, "params_ratio": n_params / before_params,
            "seconds": round(seconds, 2), "widths": layer_widths(unet)}
    save_diffusion(model.with_unet(unet), out)
    write_json(Path(metrics) / "prune.json", info)
    return info
