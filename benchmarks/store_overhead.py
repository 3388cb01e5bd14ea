"""The shared store's overhead: the main flow on a local path store vs an S3 store (SeaweedFS on loopback).

    python benchmarks/store_overhead.py            # the default params: ~15 minutes on 2 CPU cores
    python benchmarks/store_overhead.py --quick    # 100 fine-tuning steps, one 128-image evaluation seed

For each store, in a scratch project of its own (fresh Prefect home, MLflow store and caches): a cold
`diffprune run`, then the same run fully cached. For the S3 store also a second "host": another project
folder with an empty store cache and its own Prefect home, sharing the store and the MLflow database, whose
run is all cache hits served from S3 (every entry it reads is downloaded). Runs one after another, never
side by side. Writes benchmarks/results/store_overhead[-quick].{json,md}.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the SeaweedFS launcher the tests use


from benchmarks.common import save
from benchmarks.overhead import env_for, quick_parser, read_params, scratch_project, timed


def project(root: Path, raw: dict, store: str, cache: Path, db: Path) -> Path:
    raw = {**raw, "orchestration": {**raw.get("orchestration", {}), "store": store, "store_cache": str(cache)},
           "tracking": {**raw.get("tracking", {}), "uri": f"sqlite:///{db}"}}
    return scratch_project(root, raw)


def main() -> None:
    args = quick_parser(__doc__).parse_args()
    raw = read_params(args.params, args.quick)
    from servers import seaweed

    run = [sys.executable, "-m", "diffprune.flows", "run"]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="diffprune-store-overhead-") as tmp:
        tmp = Path(tmp)
        local = project(tmp / "path", raw, str(tmp / "path-store"), tmp / "unused-cache", tmp / "path.db")
        env = env_for(local)
        rows["path store"] = {"cold_s": timed(run, local, env), "cached_s": timed(run, local, env)}
        with seaweed(tmp / "s3-server") as s3:
            store = f"s3://{s3.bucket}/store"
            first = project(tmp / "s3-first", raw, store, tmp / "s3-first-cache", tmp / "s3.db")
            env = {**env_for(first), **s3.env}
            cold, cached = timed(run, first, env), timed(run, first, env)
            second = project(tmp / "s3-second", raw, store, tmp / "s3-second-cache", tmp / "s3.db")
            other = timed(run, second, {**env_for(second), **s3.env})
        rows["S3 store"] = {"cold_s": cold, "cached_s": cached, "second_host_cached_s": other}
    p, s = rows["path store"], rows["S3 store"]
    lines = ["| store | cold run | fully cached, same host | fully cached, second host (empty cache) |",
             "|---|---:|---:|---:|",
             f"| local path | {p['cold_s']:.0f} s | {p['cached_s']:.1f} s | – |",
             f"| S3 (SeaweedFS, loopback) | {s['cold_s']:.0f} s | {s['cached_s']:.1f} s | "
             f"{s['second_host_cached_s']:.1f} s |", "",
             f"S3 / path: cold {s['cold_s'] / p['cold_s']:.2f}×, cached {s['cached_s'] / p['cached_s']:.2f}×; "
             f"second host from S3 vs cached on a path store {s['second_host_cached_s'] / p['cached_s']:.2f}×."]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    save("store_overhead-quick" if args.quick else "store_overhead", {"quick": args.quick, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
