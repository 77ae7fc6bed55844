"""Seeds derived per purpose, so that no two random streams of a run coincide."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *purpose: object) -> int:
    """Return a 63-bit seed determined by ``seed`` and the words naming its purpose.

    ``derive_seed(0, "split")`` and ``derive_seed(0, "init", "n1", key)`` are
    independent streams; the same arguments give the same seed on every platform.
    """
    text = "/".join([str(int(seed))] + [str(part) for part in purpose])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
