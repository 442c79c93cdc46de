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
    batches, one_batch = [], stacks._psnr
    monkeypatch.setattr(stacks, "_psnr", lambda r, d: batches.append(len(r)) or one_batch(r, d))
    np.testing.assert_array_equal(stacks.psnr(images, dist), whole)
    assert batches == [3, 3, 3, 1]
    assert np.all(stacks.psnr(images, images) == 100.0)
    for other in (dist[:-1], dist[..., :1], dist[:, :31]):  # fewer images, channels, rows
        with pytest.raises(ValueError, match="differ in shape"):
            stacks.psnr(images, other)


def test_per_image_calls_fn_on_converted_batches_in_order():
    """fn(reference, distorted) on converted slices of `batch` images; an asymmetric fn and a converter
    that halves make an argument swap, a skipped conversion or a misplaced batch visible."""
    ref = np.arange(14, dtype=np.uint8).reshape(7, 2)
    dist = ref[::-1] + 100
    seen = []

    def fn(r, d):
        seen.append((len(r), r.dtype, d.dtype))
        return r[:, 0] - 3 * d[:, 1]

    out = stacks.per_image(fn, ref, dist, 3, convert=lambda a: a.astype(np.float64) / 2)
    want = [(2 * i - 3 * (113 - 2 * i)) / 2 for i in range(7)]  # ref[i] = (2i, 2i+1), dist[i, 1] = 113 - 2i
    assert out.dtype == np.float64 and out.tolist() == want
    assert seen == [(3, np.float64, np.float64)] * 2 + [(1, np.float64, np.float64)]


def test_per_level_names_every_stack_by_its_test_set(images):
    grid = np.stack([np.stack([noisy(images, 2 + 4 * (t * LEVELS + lv), lv) for lv in range(LEVELS)])
                     for t in range(len(DISTORTIONS))])
    out = stacks.mean_psnr(images, grid)
    assert list(out) == list(TEST_SETS[1:])
    db = [out[name]["psnr_db"] for name in TEST_SETS[1:]]
    assert db == sorted(db, reverse=True)  # more noise at every later copy
    for t in range(len(DISTORTIONS)):  # each test set's mean PSNR by hand, to its 4 decimals
        for lv in range(LEVELS):
            mse = ((images.astype(np.float64) - grid[t, lv]) ** 2).mean(axis=(1, 2, 3))
            ref = np.mean(10 * np.log10(255.0**2 / mse))
            assert abs(out[TEST_SETS[1 + t * LEVELS + lv]]["psnr_db"] - ref) <= 0.5e-4 + 1e-12 * ref
    named = stacks.per_level(grid[:2, :1], lambda d: len(d), lambda i, j: f"{i}/{j}")
    assert named == {"0/0": 10, "1/0": 10}
