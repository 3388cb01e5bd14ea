"""Counter-based seeds: a draw is named by integers (seed, step, rank, image…), never by call order."""

import hashlib


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers; distinct tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
