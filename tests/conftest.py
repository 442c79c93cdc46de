"""Fixtures shared by all tests: the repository, its params, and a tiny synthetic CIFAR-10 copy;
and `close`, the rounding bound for comparing two code paths."""
from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from iqals import params as params_lib
from iqals.data import CLASSES

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_TRAIN_PER_CLASS = 20  # 200 training images
TINY_TEST_PER_CLASS = 5    # 50 test images
TINY_SEED = 20180415


def natural_images(n: int, seed: int) -> np.ndarray:
    """n uint8 (32, 32, 3) RGB images with the statistics JPEG and blur care about.

    Each image: a smooth random colour field (coarse noise upsampled bicubically), one straight
    edge and one disk with a colour step, and fine texture of a few grey levels. Deterministic
    for a given seed; about 1 ms per image.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        img = np.empty((32, 32, 3), np.float32)
        img[:] = rng.uniform(60, 190) + rng.normal(0, 20, size=3)  # base colour, mostly grey-ish
        for cells, amp in ((2, 45.0), (4, 25.0), (8, 12.0)):  # smooth field, 1/f-like spectrum
            coarse = rng.normal(0, amp, size=(cells, cells, 1)) * np.ones(3)  # luminance ...
            coarse += rng.normal(0, amp / 4, size=(cells, cells, 3))  # ... and weaker chroma
            img += cv2.resize(coarse.astype(np.float32), (32, 32), interpolation=cv2.INTER_CUBIC)
        theta, off = rng.uniform(0, np.pi), rng.uniform(-8, 8)  # a straight edge through the image
        half = (xx - 16) * np.cos(theta) + (yy - 16) * np.sin(theta) > off
        img[half] += (rng.normal(0, 35) + rng.normal(0, 8, size=3)).astype(np.float32)
        cy, cx, r = rng.uniform(6, 26), rng.uniform(6, 26), rng.uniform(3, 8)  # an object
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        colour = rng.uniform(30, 225) + rng.normal(0, 25, size=3)
        img[disk] = 0.4 * img[disk] + 0.6 * colour.astype(np.float32)
        tex = rng.normal(0, rng.uniform(2, 8), size=(32, 32)).astype(np.float32)  # texture
        img += cv2.GaussianBlur(tex, (3, 3), 0.6)[..., None] + rng.normal(0, 1.5, size=(32, 32, 3))
        out[i] = np.clip(np.floor(img + 0.5), 0, 255).astype(np.uint8)
    return out


def close(a, b, terms: int, what: str = "", rtol: float = 0.0) -> None:
    """Two code paths summing the same `terms` products in other orders (other kernels, CPUs,
    memory layouts): rounding of about eps x sqrt(terms) relative to b's scale (a random walk),
    eps of the less precise of the two dtypes; a mixed-up run, batch or channel is O(1). In fp32 a
    3x3 max pool whose two largest inputs lie within rounding may route a gradient to the other
    one: compare gradients in float64 where that matters. Tensors or numpy arrays; `what` names them;
    rtol adds a relative part (a rounding to a coarser dtype on one side)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
    torch.testing.assert_close(a, b, rtol=rtol, atol=8 * eps * terms ** 0.5 * b.abs().max().item(), check_dtype=False,
                               msg=(lambda m: f"{what}: {m}") if what else None)


def balanced_labels(per_class: int, rng: np.random.Generator) -> np.ndarray:
    """per_class labels of each class in shuffled order (the official order is not sorted)."""
    return rng.permutation(np.repeat(np.arange(10, dtype=np.int64), per_class))


def write_copy(directory: Path, train, test, classes=True) -> Path:
    """Write a local copy directory in the documented format; train/test are (images, labels)."""
    directory.mkdir(parents=True, exist_ok=True)
    extra = {"classes": np.array(CLASSES)} if classes else {}
    for split, (x, y) in (("train", train), ("test", test)):
        np.savez(directory / f"{split}.npz", images=x, labels=y, **extra)
    return directory


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def params(repo_root):
    return params_lib.load(repo_root / "params.yaml")


@pytest.fixture(scope="session")
def _raw_params_pristine(repo_root) -> dict:
    with open(repo_root / "params.yaml") as f:
        return yaml.safe_load(f)


@pytest.fixture
def raw_params(_raw_params_pristine) -> dict:
    """The params.yaml mapping, a fresh deep copy per test so tests may mutate it."""
    return copy.deepcopy(_raw_params_pristine)


@pytest.fixture(scope="session")
def tiny_arrays():
    """(train, test) of the tiny copy as ((images, labels), (images, labels)); do not mutate."""
    rng = np.random.default_rng(TINY_SEED)
    ytr = balanced_labels(TINY_TRAIN_PER_CLASS, rng)
    yte = balanced_labels(TINY_TEST_PER_CLASS, rng)
    xtr = natural_images(len(ytr), TINY_SEED + 1)
    xte = natural_images(len(yte), TINY_SEED + 2)
    for a in (xtr, ytr, xte, yte):
        a.flags.writeable = False
    return (xtr, ytr), (xte, yte)


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory, tiny_arrays) -> Path:
    """A local CIFAR-10 copy: train.npz (200 images, 20 per class) and test.npz (50 images)."""
    train, test = tiny_arrays
    return write_copy(tmp_path_factory.mktemp("cifar10_tiny"), train, test)
