"""Prefect artifacts of a flow run: the report as markdown, sample grids inlined, comparison tables."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from diffprune.common.atomic import atomic_file


def publish_report(markdown: str, grids: list[Path], key: str, out_file: Path) -> Path:
    """The report as a Prefect markdown artifact, the grids as an image artifact, and a file on disk."""
    create_markdown_artifact(markdown=markdown, key=key, description="teacher vs pruned model")
    publish_grids({g.stem.replace("_", " "): g for g in grids}, f"{key}-samples")
    with atomic_file(out_file) as fh:
        fh.write(markdown)
    return out_file


def publish_grids(grids: dict[str, Path], key: str) -> None:
    """Sample grids inlined as PNG data (the UI shows no local files; image artifacts need public URLs)."""
    images = [f"### {title}\n\n![{title}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
              for title, path in grids.items() if path.is_file()]
    if images:
        create_markdown_artifact(markdown="\n\n".join(images), key=key,
                                 description="sample grids (same noise for teacher and pruned model)")


def publish_table(rows: list[dict], key: str, description: str) -> None:
    create_table_artifact(table=rows, key=key, description=description)
