"""Atomic file output: a killed stage leaves the previous file or none, never a truncated one."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path of `path`'s name, in a hidden folder of its own beside `path` (the
    writer creates the file, so it gets the usual permissions); rename it onto `path` only if the
    block succeeds. The same name: a writer that records it (torch.save names its archive after the
    file) writes the bytes it would write to `path`, so a rerun's outputs hash the same in dvc.lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    folder.mkdir()
    tmp = folder / path.name
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Plain .npy so that readers can memory-map it (np.load(..., mmap_mode="r"))."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
