"""Where and with which randomness a computation runs: counter-based seeds and the device rule.

Seeds: a draw is named by integers (seed, step, rank, image…), never by call order.
"""

from __future__ import annotations

import hashlib
import os

import torch

from diffprune.common.errors import DiffpruneError


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers; distinct tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def resolve_device(choice: str) -> torch.device:
    """One rule for every stage that has a ``device`` param. ``auto``: this process's GPU when CUDA is there —
    ``cuda:LOCAL_RANK`` under ``accelerate launch``, so data-parallel processes never share GPU 0 — else the
    CPU; ``cpu``, ``cuda`` (the current GPU) and ``cuda:N`` are taken as asked, and a GPU that is not there
    is refused in one line."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if choice == "auto":
        rank = os.environ.get("LOCAL_RANK")
        return torch.device(f"cuda:{rank}" if rank is not None else "cuda")
    device = torch.device(choice)
    if not torch.cuda.is_available():
        raise DiffpruneError(f"device {choice!r}: no CUDA device is available (use 'auto' or 'cpu')")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DiffpruneError(f"device {choice!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device
