"""iqals/stacks.py: PSNR, its batching, and the per-level summaries of a grid of stacks."""
from __future__ import annotations

import numpy as np
import pytest

from iqals import stacks
from iqals.params import DISTORTIONS, LEVELS, TEST_SETS
from tests.conftest import natural_images


@pytest.fixture(scope="module")
def images():
    return natural_images(10, 5)


def noisy(images, sd, seed):
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sd, images.shape), 0, 255).round().astype(np.uint8)


def test_psnr_by_hand_and_across_batch_boundaries(images, monkeypatch):
    dist = noisy(images, 8, 0)
    mse = ((images.astype(np.float64) - dist) ** 2).mean(axis=(1, 2, 3))
    whole = stacks.psnr(images, dist)
    np.testing.assert_allclose(whole, 10 * np.log10(255.0**2 / mse), rtol=1e-12)
    monkeypatch.setattr(stacks, "BATCH", 3)  # 10 images: batches of 3, 3, 3, 1
    np.testing.assert_array_equal(stacks.psnr(images, dist), whole)
    assert np.all(stacks.psnr(images, images) == 100.0)
    with pytest.raises(ValueError, match="differ in shape"):
        stacks.psnr(images, dist[:-1])


def test_per_level_names_every_stack_by_its_test_set(images):
    grid = np.stack([np.stack([noisy(images, 2 + 4 * (t * LEVELS + lv), lv) for lv in range(LEVELS)])
                     for t in range(len(DISTORTIONS))])
    out = stacks.mean_psnr(images, grid)
    assert list(out) == list(TEST_SETS[1:])
    db = [out[name]["psnr_db"] for name in TEST_SETS[1:]]
    assert db == sorted(db, reverse=True)  # more noise at every later copy
    assert out["noise_2"]["psnr_db"] == round(float(stacks.psnr(images, grid[1, 1]).mean()), 4)
    named = stacks.per_level(grid[:2, :1], lambda d: len(d), lambda i, j: f"{i}/{j}")
    assert named == {"0/0": 10, "1/0": 10}
