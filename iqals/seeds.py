"""Seeds per purpose, all derived from one root (STYLE.md, convention 8)."""
from __future__ import annotations

import zlib

import numpy as np


def derive_seed(root: int, *purpose: str | int) -> int:
    """A 63-bit seed for `purpose` (e.g. "noise", "train", 2), stable across runs and machines."""
    words = [int(root)] + [zlib.crc32(str(p).encode()) for p in purpose]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))
