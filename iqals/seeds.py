"""Seeds per purpose (distortion noise, epoch draw, initialisation), all derived from one root."""
from __future__ import annotations

import zlib

import numpy as np


def derive_seed(root: int, *purpose: str | int) -> int:
    """A 63-bit seed for `purpose` (e.g. "noise", "train", 2), stable across runs and machines."""
    words = [int(root)] + [zlib.crc32(str(p).encode()) for p in purpose]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))


def image_streams(key: int, n: int, index=None, who: str = "index") -> list[np.random.Generator]:
    """One counter-based Philox stream per image i, keyed by (key, index[i]), its position in the
    official split (default 0..n-1): an image draws the same numbers in a subset as in the full
    set. `who` names the caller in the error."""
    index = np.arange(n) if index is None else np.asarray(index)
    if index.shape != (n,):
        raise ValueError(f"{who}: index has shape {index.shape}, expected ({n},)")
    return [np.random.Generator(np.random.Philox(key=[key, int(j)])) for j in index]
