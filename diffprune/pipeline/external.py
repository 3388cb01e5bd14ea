"""Inputs a stage reads from outside the store (an image folder, a shipped or local teacher, Inception's
weights): their content digests enter the stage's cache key. Named by the stage table (``Stage.external``);
each takes the stage's params (as JSON) and returns ``{input name: digest}``, empty when there is none.
Plain functions over files: no torch, so cache checks stay cheap."""

from __future__ import annotations

from pathlib import Path

from diffprune.common.digests import input_digest
from diffprune.family.hub import resolve_revision
from diffprune.family.shipped import ASSETS, BUILTIN_TEACHER


def image_folder(params: dict) -> dict[str, str]:
    """``prepare``: the images of an ``imagefolder`` dataset (the other datasets are fixed by their name)."""
    return {"images": input_digest(params["path"])} if params.get("dataset") == "imagefolder" else {}


def teacher_source(params: dict) -> dict[str, str]:
    """``teacher``: a shipped teacher's folder, or a pretrained one — a local folder by content, a hub id by
    the commit its revision resolves to (scratch training has no outside input)."""
    if params.get("source") == "builtin":
        return {"builtin": input_digest(ASSETS / params.get("builtin", BUILTIN_TEACHER.name))}
    if params.get("source") == "pretrained":
        ref = params["pretrained"]
        if Path(ref).is_dir():
            return {"pretrained": input_digest(ref)}
        return {"pretrained": f"hub:{ref}@{resolve_revision(ref, params.get('revision'))}"}
    return {}


def inception_weights(params: dict) -> dict[str, str]:
    """``evaluate``: clean-fid's Inception weight file when FID may use it ("absent": the fallback runs)."""
    if params.get("fid_extractor") == "classifier":
        return {}
    weights = Path(params["inception_path"])
    return {"inception": input_digest(weights) if weights.is_file() else "absent"}
