"""Tiny configurations shared by the tests (a module, not conftest, so tests can import it)."""

from diffprune.pipeline.stage_params import ArchParams, DataParams, EvaluateParams, ExtractorParams, TrainParams

TINY_ARCH = ArchParams(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), norm_num_groups=4)
TINY_DATA = DataParams(resolution=8, max_images=240)


def tiny_train(**kw) -> TrainParams:
    base = dict(steps=6, batch_size=8, lr=1e-3, checkpoint_every=3, log_every=1, device="cpu")
    return TrainParams(**{**base, **kw})


def tiny_eval(cache_dir, **kw) -> EvaluateParams:
    base = dict(steps=4, seeds=(0, 1), n_samples=24, batch_size=16, cache_dir=str(cache_dir),
                extractor=ExtractorParams(epochs=2), latency_batch=4, latency_steps=2, latency_repeats=1,
                grid_images=16)
    return EvaluateParams(**{**base, **kw})


# A params.yaml for the whole stage chain on tiny models (CLI and DVC tests).
TINY_PARAMS = {
    "data": {"resolution": 8, "max_images": 240},
    "teacher": {
        "source": "scratch",
        "num_train_timesteps": 100,   # a short schedule keeps diff-pruning's timestep loop short
        "architecture": {"block_out_channels": [16, 32], "attention_levels": [1], "norm_num_groups": 4},
        "train": {"steps": 8, "batch_size": 8, "checkpoint_every": 4},
    },
    "score": {"criterion": "diff-pruning", "batch_size": 8},
    "prune": {"pruning_ratio": 0.3},
    "finetune": {"steps": 4, "batch_size": 8, "checkpoint_every": 2},
    "evaluate": {"steps": 3, "seeds": [0, 1], "n_samples": 16, "batch_size": 16, "extractor": {"epochs": 2},
                 "latency_batch": 2, "latency_steps": 2, "latency_repeats": 1, "grid_images": 8},
}


def flow_params(root, **groups) -> dict:
    """TINY_PARAMS for the Prefect flows: stages in-process, store and MLflow under ``root``, a lenient gate."""
    root = str(root)
    params = {**TINY_PARAMS,
              "orchestration": {"store": f"{root}/artifacts/store", "executor": "inline", "retries": 0},
              "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "artifact_root": f"{root}/mlartifacts"},
              "register": {"max_fid_ratio": 100.0, "max_macs_ratio": 1.0, "predict_steps": 2},
              "schedule": {"params": f"{root}/params.yaml"}}
    for group, values in groups.items():
        params[group] = {**params.get(group, {}), **values}
    return params
