"""iqals.iqa against skimage, closed forms and hand computations.

SSIM reference: skimage.metrics.structural_similarity on float64 luminance Y = 0.299 R +
0.587 G + 0.114 B with gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=255 (Wang et al. 2004), on natural-looking synthetic images and the study's own
blur, noise and JPEG distortions of them.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from iqals import distort, iqa, stacks
from iqals.params import IQA, SSIM

TOL = 1e-10  # per image, against skimage (both float64)


def luminance64(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float64)
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def skimage_ssim(ref: np.ndarray, dist: np.ndarray, p) -> np.ndarray:
    """Per-image skimage SSIM with the window, constants and data range of cfg.ssim p."""
    yr, yd = luminance64(ref), luminance64(dist)
    return np.array([structural_similarity(a, b, gaussian_weights=True, sigma=p.sigma, win_size=p.win_size,
                                           K1=p.k1, K2=p.k2, use_sample_covariance=False,
                                           data_range=p.data_range) for a, b in zip(yr, yd)])


@pytest.fixture(scope="module")
def cfg(params):
    return params.iqa


@pytest.fixture(scope="module")
def images(tiny_arrays) -> np.ndarray:
    """100 natural-looking uint8 RGB images (smooth fields, an edge, a disk, texture)."""
    return tiny_arrays[0][0][:100].copy()


@pytest.fixture(scope="module")
def versions(images, params) -> np.ndarray:
    """The 9 distorted versions (blur, noise, JPEG x 3 levels) of `images`: (9, N, 32, 32, 3)."""
    return distort.distort_all(images, params.distort, seed=7, split="test").reshape((9,) + images.shape)


@pytest.fixture(scope="module")
def reference(images, versions, cfg) -> np.ndarray:
    return np.stack([skimage_ssim(images, v, cfg.ssim) for v in versions])


# ------------------------------------------------------------------------------ SSIM

def test_score_all_matches_skimage(images, versions, reference, cfg):
    s = iqa.score_all(images, versions, cfg)
    assert s.shape == (9, len(images)) and s.dtype == np.float64
    assert np.abs(s - reference).max() < TOL
    # the distortions span a wide range of scores, so this is not a test of near-1 values only
    assert reference.min() < 0.5 and reference.max() > 0.95


def test_single_pair_api_matches_skimage_and_score_all(images, versions, reference, cfg):
    s_all = iqa.score_all(images, versions, cfg)
    for v in (0, 4, 8):  # blur 1, noise 2, JPEG 3
        s = iqa.METRICS["ssim"](images, versions[v], cfg)
        assert s.shape == (len(images),) and s.dtype == np.float64
        assert np.abs(s - reference[v]).max() < TOL
        np.testing.assert_allclose(s, s_all[v], rtol=0, atol=1e-12)


def test_extreme_images_match_skimage(cfg):
    """Saturated, flat, high-contrast and noise images: the cancellation worst cases."""
    rng = np.random.default_rng(3)
    n = 24
    ref = np.empty((n, 32, 32, 3), np.uint8)
    ref[:6] = rng.integers(0, 256, size=(6, 32, 32, 3))                 # white noise
    ref[6:12] = np.where(rng.random((6, 32, 32, 1)) < 0.5, 0, 255)      # black/white pixels
    ref[12:18] = rng.integers(0, 256, size=(6, 1, 1, 3))                 # flat colours
    ref[18:] = 250 + rng.integers(0, 6, size=(6, 32, 32, 3))             # near-white, tiny detail
    dist = np.clip(ref.astype(int) + rng.integers(-40, 41, size=ref.shape), 0, 255).astype(np.uint8)
    dist[12:15] = ref[12:15]  # flat and identical: both variances zero
    assert np.abs(iqa.METRICS["ssim"](ref, dist, cfg) - skimage_ssim(ref, dist, cfg.ssim)).max() < TOL


def test_brightness_shift_and_inversion_match_skimage(images, cfg):
    """Large changes of the local mean."""
    for dist in (np.clip(images.astype(int) + 120, 0, 255).astype(np.uint8), 255 - images):
        assert np.abs(iqa.METRICS["ssim"](images, dist, cfg) - skimage_ssim(images, dist, cfg.ssim)).max() < TOL


def test_other_window_and_constants_match_skimage(images, versions):
    """iqa.ssim the single-pair API and score_all, the score stage's, both read cfg.ssim."""
    p = SSIM(win_size=7, sigma=0.8, k1=0.02, k2=0.05, data_range=255.0)
    cfg = IQA(metric="ssim", transform="identity", transform_scale=1.0, clip=(0.1, 1.0), ssim=p)
    want = skimage_ssim(images[:40], versions[5, :40], p)
    assert np.abs(iqa.METRICS["ssim"](images[:40], versions[5, :40], cfg) - want).max() < TOL
    assert np.abs(iqa.score_all(images[:40], versions[5:6, :40], cfg)[0] - want).max() < TOL


def test_non_square_images_and_a_side_the_window_size_match_skimage(images, versions, cfg):
    """Rows and columns filtered by their own window matrices; a side exactly win_size long leaves one valid row
    (skimage accepts it), one shorter is refused."""
    win = cfg.ssim.win_size
    for h, w in ((20, 32), (32, win), (win, 27)):
        ref, dist = images[:10, :h, :w], versions[8, :10, :h, :w]
        assert np.abs(iqa.METRICS["ssim"](ref, dist, cfg) - skimage_ssim(ref, dist, cfg.ssim)).max() < TOL, (h, w)
    with pytest.raises(ValueError, match="larger than"):
        iqa.METRICS["ssim"](images[:2, :win - 1], images[:2, :win - 1], cfg)


def test_identical_images_score_exactly_one(images, cfg):
    assert np.all(iqa.METRICS["ssim"](images, images, cfg) == 1.0)


def test_flat_grey_images_closed_form(cfg):
    # Grey (R = G = B) flat images: Y is the grey level, variances vanish and
    # SSIM = (2 x y + c1) / (x^2 + y^2 + c1).
    levels = np.array([(0, 0), (0, 255), (100, 120), (200, 30), (255, 254)], dtype=np.uint8)
    ref = np.broadcast_to(levels[:, 0, None, None, None], (len(levels), 32, 32, 3))
    dist = np.broadcast_to(levels[:, 1, None, None, None], (len(levels), 32, 32, 3))
    x, y = levels[:, 0].astype(np.float64), levels[:, 1].astype(np.float64)
    c1 = (cfg.ssim.k1 * cfg.ssim.data_range) ** 2
    np.testing.assert_allclose(iqa.METRICS["ssim"](ref, dist, cfg), (2 * x * y + c1) / (x * x + y * y + c1),
                               rtol=0, atol=1e-12)


def test_symmetric_and_bounded(images, versions, cfg):
    s_xy = iqa.score_all(images, versions, cfg)
    s_yx = np.stack([iqa.METRICS["ssim"](v, images, cfg) for v in versions])
    assert np.abs(s_xy - s_yx).max() < TOL
    assert np.all(s_xy <= 1.0) and np.all(s_xy > -1.0)


def test_more_distortion_lowers_ssim(images, versions, cfg):
    s = iqa.score_all(images, versions, cfg).reshape(3, 3, -1)
    assert np.all(s[0, 0] > s[0, 1]) and np.all(s[0, 1] > s[0, 2])  # blur: every image
    assert np.all(np.diff(s.mean(axis=2), axis=1) < 0)               # every type, on average


def test_independent_of_batching_order_and_layout(images, versions, cfg, monkeypatch):
    s = iqa.score_all(images, versions, cfg)
    monkeypatch.setattr(iqa, "CHUNK", 7)  # chunks of 7 images, a ragged last one
    np.testing.assert_allclose(iqa.score_all(images, versions, cfg), s, rtol=0, atol=1e-12)
    perm = np.random.default_rng(0).permutation(len(images))
    np.testing.assert_allclose(iqa.score_all(images[perm], versions[:, perm], cfg), s[:, perm],
                               rtol=0, atol=1e-12)
    # non-contiguous, read-only views (the score stage passes a memory-mapped file)
    view = versions[:, ::2]
    view.flags.writeable = False
    np.testing.assert_allclose(iqa.score_all(images[::2], view, cfg), s[:, ::2], rtol=0, atol=1e-12)


def test_shape_errors(images, versions, cfg):
    with pytest.raises(ValueError, match="differ in shape"):
        iqa.METRICS["ssim"](images[:5], images[:6], cfg)
    with pytest.raises(ValueError, match="do not match"):
        iqa.score_all(images[:5], versions[:, :6], cfg)
    small = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="larger than"):
        iqa.METRICS["ssim"](small, small, cfg)
    rgba = np.zeros((2, 32, 32, 4), np.uint8)  # RGB only: no luminance of four channels
    with pytest.raises(ValueError, match="do not match"):
        iqa.METRICS["ssim"](rgba, rgba, cfg)


# ------------------------------------------------------------------------------ PSNR, score_all

def test_psnr_matches_hand_computation(images, versions, cfg):
    for v in versions[[0, 5, 8]]:
        mse = ((images.astype(np.float64) - v.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(stacks.psnr(images, v, cfg), 10 * np.log10(255.0**2 / mse), rtol=1e-12)
    assert np.all(stacks.psnr(images, images, cfg) == 100.0)  # identical: capped


def test_score_all_other_metrics_loop_over_versions(images, versions, cfg):
    c = dataclasses.replace(cfg, metric="psnr")
    s = iqa.score_all(images, versions[:4], c)
    assert s.shape == (4, len(images))
    np.testing.assert_array_equal(s, np.stack([iqa.METRICS["psnr"](images, v, c) for v in versions[:4]]))
    with pytest.raises(ValueError, match="not in iqals.iqa.METRICS"):
        iqa.score_all(images, versions, dataclasses.replace(cfg, metric="no_such_measure"))


# ------------------------------------------------------------------------------ T and the clip

def test_target_probability_clips(cfg):
    c = dataclasses.replace(cfg, transform="identity", clip=(0.1, 1.0))
    s = np.array([-0.3, 0.0, 0.05, 0.1, 0.5, 1.0, 1.2])
    np.testing.assert_array_equal(iqa.target_probability(s, c), [0.1, 0.1, 0.1, 0.1, 0.5, 1.0, 1.0])
    assert iqa.target_probability(s.tolist(), c).dtype == np.float64


def test_transforms(cfg):
    s = np.array([0.0, 10.0, 50.0, 80.0])
    np.testing.assert_array_equal(iqa.TRANSFORMS["identity"](s, 3.0), s)
    np.testing.assert_allclose(iqa.TRANSFORMS["linear"](s, 50.0), s / 50.0)
    np.testing.assert_allclose(iqa.TRANSFORMS["exp_decay"](s, 10.0), np.exp(-s / 10.0))
    c = dataclasses.replace(cfg, transform="linear", transform_scale=50.0, clip=(0.1, 1.0))
    np.testing.assert_allclose(iqa.target_probability(s, c), [0.1, 0.2, 1.0, 1.0])
    c = dataclasses.replace(cfg, transform="exp_decay", transform_scale=10.0, clip=(0.2, 0.9))
    np.testing.assert_allclose(iqa.target_probability(s, c), np.clip(np.exp(-s / 10.0), 0.2, 0.9))


def test_each_name_params_validates_is_its_own_measure_and_transform():
    """params.py names the measures and transforms (it validates iqa.* without importing this
    module); iqa.py pairs the names with functions in that order: each name gets its own."""
    from iqals import iqa_piq, stacks
    assert iqa.METRICS == {"ssim": iqa.ssim, "gmsd": iqa_piq.gmsd, "fsim": iqa_piq.fsim, "vif": iqa_piq.vif,
                           "psnr": stacks.psnr}
    s = np.array([0.5, 2.0])
    got = {name: t(s, 4.0) for name, t in iqa.TRANSFORMS.items()}
    np.testing.assert_array_equal(got["identity"], s)
    np.testing.assert_array_equal(got["linear"], s / 4.0)
    np.testing.assert_array_equal(got["exp_decay"], np.exp(-s / 4.0))


def test_summary_of_a_level_counts_the_targets_the_clip_changed(params):
    """What the score stage reports per level: the scores' distribution, the mean target T(s) after
    the clip, and how many targets the clip changed (below the floor or above 1)."""
    s = np.array([0.05, 0.5, 0.95, -0.2, 1.0, 0.3])
    cfg = dataclasses.replace(params.iqa, transform="identity", clip=(0.1, 1.0))
    want = {"mean": s.mean(), "std": s.std(), "p05": np.percentile(s, 5), "median": np.median(s),
            "p95": np.percentile(s, 95), "target_mean": np.mean([0.1, 0.5, 0.95, 0.1, 1.0, 0.3])}
    assert iqa.summary(s, cfg) == {**{k: round(float(v), 5) for k, v in want.items()}, "clipped": 2}
    # a distance through exp_decay (scale 0.1): exp(-0.5 / 0.1) = 0.0067 is raised to the floor; 0 maps to 1
    cfg = dataclasses.replace(cfg, transform="exp_decay", transform_scale=0.1)
    out = iqa.summary(np.array([0.0, 0.5, 0.1]), cfg)
    assert out["clipped"] == 1 and out["target_mean"] == round((1 + 0.1 + np.exp(-1)) / 3, 5)
    cfg = dataclasses.replace(cfg, transform="linear", transform_scale=50.0)  # PSNR above 50 dB is capped at 1
    assert iqa.summary(np.array([60.0, 25.0]), cfg)["clipped"] == 1
    # a ceiling below 1 (iqa.clip [0.1, 0.9]) lowers the targets above it: 0.95 and 1.0 -> 0.9
    cfg = dataclasses.replace(cfg, transform="identity", clip=(0.1, 0.9))
    out = iqa.summary(np.array([0.95, 0.5, 1.0, 0.05]), cfg)
    assert out["clipped"] == 3 and out["target_mean"] == round((0.9 + 0.5 + 0.9 + 0.1) / 4, 5)
