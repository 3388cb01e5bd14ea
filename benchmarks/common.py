"""What every benchmark records next to its numbers: the machine, the library versions, the date, the command."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    import torch

    from diffprune.pipeline.fingerprint import library_versions

    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), **library_versions()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def save(name: str, payload: dict, markdown: str | None = None, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str) + "\n")
    if markdown is not None:
        (out / f"{name}.md").write_text(markdown)
    return path


def mean_std(values: list[float]) -> tuple[float, float]:
    import numpy as np

    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if not arr.size:
        return float("nan"), float("nan")
    # sample sd (n − 1): the spread of the population of seeds, as the paired tables report it
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
