"""CIFAR-10 in: a local copy or the official archive, validated, as uint8 arrays.

Format of `data/raw/{train,test}.npz` (the same as a local copy): `images` uint8 (N, 32, 32, 3)
RGB, `labels` int64 (N,), official order. An optional `classes` array of names is checked.
"""
from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import ExpectedError
from .params import NUM_CLASSES

log = logging.getLogger(__name__)

LOCAL_COPY_ENV = "CIFAR10_LOCAL"  # directory holding train.npz and test.npz
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = {"train": 50_000, "test": 10_000}  # official sizes: a copy may hold fewer test images


class DataError(ExpectedError, ValueError):
    """A data source is missing, corrupt or not CIFAR-10 as expected."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate(images, labels, where: str, split: str, classes=None) -> None:
    """Raise DataError naming `where` unless the arrays are CIFAR-10 as documented above."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{where}: images must have shape (N, 32, 32, 3) RGB, got {images.shape}")
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape != (len(images),):
        raise DataError(f"{where}: labels must have shape ({len(images)},), got {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{where}: labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    if len(images) == 0 or len(images) > SPLITS[split]:
        raise DataError(f"{where}: expected 1..{SPLITS[split]} {split} images, got {len(images)}")
    if classes is not None and tuple(str(c) for c in classes) != CLASSES:
        raise DataError(f"{where}: class names/order {[str(c) for c in classes]} differ from {list(CLASSES)}")


def load_npz(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing (expected {split}.npz with arrays images, labels)")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
            raise DataError(f"{path}: a single .npy array, not an npz archive (expected arrays images, labels)")
        with z:
            if missing := {"images", "labels"} - set(z.files):
                raise DataError(f"{path}: lacks arrays {sorted(missing)} (expected images, labels)")
            images, labels = z["images"], z["labels"]
            classes = z["classes"] if "classes" in z.files else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: unreadable or truncated npz ({type(e).__name__}: {e})") from None
    validate(images, labels, str(path), split, classes)
    return images, labels.astype(np.int64)


def load_local(directory: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{LOCAL_COPY_ENV}={directory}: not a directory (expected one holding train.npz and test.npz)")
    return load_raw(directory)


def load_official(root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official python archive via torchvision, which verifies its MD5 checksum."""
    from torchvision.datasets import CIFAR10

    out = {}
    for split in SPLITS:
        try:
            ds = CIFAR10(root=str(root), train=(split == "train"), download=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise DataError(f"could not download CIFAR-10 into {root} ({type(e).__name__}: {e}). Without network, set "
                            f"{LOCAL_COPY_ENV} to a directory holding train.npz and test.npz (images uint8 (N,32,32,3) "
                            "RGB, labels int64), e.g. ../shared/data/cifar10") from None
        images, labels = np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)
        validate(images, labels, f"torchvision CIFAR10({split})", split, ds.classes)
        if len(images) != SPLITS[split]:
            raise DataError(f"official {split} set has {len(images)} images, expected {SPLITS[split]}")
        out[split] = images, labels
    return out


def subset_indices(data, train_size: int | None, test_size: int | None) -> dict[str, np.ndarray]:
    """Positions kept: the first base.train_size/K images of each class, the first base.test_size test images."""
    ytr, yte = data["train"][1], data["test"][1]
    keep = {"train": np.arange(len(ytr)), "test": np.arange(len(yte))}
    if train_size is not None:
        if train_size > len(ytr):
            raise DataError(f"base.train_size={train_size} exceeds the {len(ytr)} training images")
        per_class = train_size // NUM_CLASSES
        idx = [np.flatnonzero(ytr == k)[:per_class] for k in range(NUM_CLASSES)]
        if any(len(i) < per_class for i in idx):
            raise DataError(f"base.train_size={train_size}: the source has fewer than {per_class} images of some class")
        keep["train"] = np.sort(np.concatenate(idx))
    if test_size is not None:
        if test_size > len(yte):
            raise DataError(f"base.test_size={test_size} exceeds the {len(yte)} test images of the "
                            "source (the local copy in ../shared/data holds 1,000); use null for all")
        keep["test"] = keep["test"][:test_size]
    return keep


def official_index(path: str | Path) -> np.ndarray:
    """Each image's position in the official split, as saved by the download stage."""
    with np.load(path) as z:
        return z["index"] if "index" in z.files else np.arange(len(z["labels"]))


def acquire(cache_dir: str | Path):
    """The local copy named by $CIFAR10_LOCAL if set, else the official archive."""
    if local := os.environ.get(LOCAL_COPY_ENV):
        log.info("loading the local copy %s", local)
        return load_local(local), {"source": "local copy"}
    log.info("no %s set: downloading the official archive into %s", LOCAL_COPY_ENV, cache_dir)
    return load_official(cache_dir), {"source": "official archive"}


def load_raw(directory: str | Path):
    """Read data/raw as written by the download stage."""
    return {split: load_npz(Path(directory) / f"{split}.npz", split) for split in SPLITS}
