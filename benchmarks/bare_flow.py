"""The yardstick of a fully cached `diffprune run`: a bare Prefect flow of 7 cached tasks (one per
stage, each fed the previous one's result, results persisted as JSON) on the same temporary server.

    python benchmarks/bare_flow.py     # run it twice: the second run is all cache hits
"""

from prefect import flow, task
from prefect.cache_policies import INPUTS

STAGES = ("prepare", "teacher", "score", "prune", "finetune", "evaluate", "register")


@task(cache_policy=INPUTS, persist_result=True, result_serializer="json")
def stage(name: str, upstream: dict | None) -> dict:
    return {"stage": name, "after": upstream["stage"] if upstream else None}


@flow(name="bare-pipeline")
def bare() -> dict:
    ref = None
    for name in STAGES:
        ref = stage(name, ref)
    return ref


if __name__ == "__main__":
    bare()
