"""Where and with which randomness a computation runs: counter-based seeds and the device rule.

Seeds: a draw is named by integers (seed, step, rank, image…), never by call order.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers; distinct tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def resolve_device(choice: str) -> torch.device:
    """One rule for every stage that has a ``device`` param: ``auto`` takes CUDA when present; ``cuda`` and
    ``cpu`` are taken as asked."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
