"""diffprune: structural pruning of diffusion models (Diff-Pruning) as a reproducible pipeline."""

from diffprune.common.version import VERSION as __version__  # noqa: F401

# What a pruned folder's model_index.json names (diffusers looks classes up on the module it names): loaded on
# first use, so that `import diffprune` stays free of torch for the processes that only check cache keys.
_PORTABLE = ("PrunedUNet2DModel", "PrunedUNet2DConditionModel", "ClassConditionalPipeline", "ModelMixin")


def __getattr__(name: str):
    if name in _PORTABLE:
        from diffprune.family import portable

        return getattr(portable, name)
    raise AttributeError(f"module 'diffprune' has no attribute {name!r}")
