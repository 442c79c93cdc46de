"""GMSD, FSIM and VIF from piq (iqals/iqa_piq.py): perfect values, monotonicity, batching, argument
order, and independent NumPy re-implementations of GMSD (Xue et al., GMSD.m) and VIF-p
(Sheikh & Bovik, vifp_mscale.m). Synthetic images only; a few seconds."""
from __future__ import annotations

import numpy as np
import piq
import pytest
import torch
from scipy import signal

from iqals import distort, iqa_piq
from tests.conftest import natural_images

MEASURES = ("gmsd", "fsim", "vif")
PERFECT = {"gmsd": 0.0, "fsim": 1.0, "vif": 1.0}
HIGHER_IS_BETTER = {"gmsd": False, "fsim": True, "vif": True}


N_IMAGES = 6
KINDS = ("blur", "noise", "jpeg")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return natural_images(N_IMAGES, 11)


@pytest.fixture(scope="module")
def stacks(images) -> tuple[np.ndarray, np.ndarray]:
    """(reference, distorted) stacks of 10 x N_IMAGES pairs: first the images against themselves,
    then blur, noise and JPEG at the study's three levels (params.yaml), mildest first. One stack,
    because each piq call has a fixed cost (oneDNN sets up every convolution, ~35 ms each)."""
    dists = [images]
    dists += [distort.blur(images, s, "matlab", "replicate") for s in (0.7, 1.0, 1.2)]
    dists += [distort.noise(images, v, 5) for v in (0.005, 0.01, 0.02)]
    dists += [distort.jpeg(images, q, "420") for q in (12, 8, 4)]
    return np.concatenate([images] * len(dists)), np.concatenate(dists)


@pytest.fixture(scope="module")
def scores(stacks) -> dict[str, np.ndarray]:
    """Each measure on all pairs, reshaped (10, N_IMAGES): row 0 identical, then 3 per kind."""
    ref, dist = stacks
    return {n: getattr(iqa_piq, n)(ref, dist, None).reshape(10, N_IMAGES) for n in MEASURES}


def _y(rgb_uint8: np.ndarray) -> np.ndarray:
    """Luminance Y = 0.299 R + 0.587 G + 0.114 B of one uint8 image, float64 on [0, 1]."""
    x = rgb_uint8.astype(np.float64) / 255.0
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def gmsd_reference(ref: np.ndarray, dist: np.ndarray) -> float:
    """GMSD.m (Xue et al. 2014) on [0, 1] luminance: 2x2 mean then stride 2 (what GMSD.m's
    conv2(Y, ones(2)/4, 'same') followed by Y(1:2:end, 1:2:end) selects), zero-padded Prewitt
    gradients, GMS with T = 170/255^2, and the standard deviation of the GMS map. piq takes the
    population standard deviation; GMSD.m's std2 divides by n - 1, i.e. multiplies by
    sqrt(256/255) on a 16x16 map. We follow piq."""
    def down(y):
        h, w = y.shape
        return y.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    dx = np.array([[1.0, 0.0, -1.0]] * 3) / 3.0

    def grad(y):
        gx = signal.convolve2d(y, dx, mode="same", boundary="fill")
        gy = signal.convolve2d(y, dx.T, mode="same", boundary="fill")
        return np.sqrt(gx**2 + gy**2)

    g1, g2 = grad(down(_y(ref))), grad(down(_y(dist)))
    t = 170.0 / 255.0**2
    gms = (2 * g1 * g2 + t) / (g1**2 + g2**2 + t)
    return float(gms.std())


def vif_reference(ref: np.ndarray, dist: np.ndarray, sigma_nsq: float = 2.0,
                  eps: float = 1e-10) -> tuple[float, float, int]:
    """vifp_mscale.m (Sheikh & Bovik, LIVE) on 0-255 luminance, float64: (num, den, the number of
    log terms in each), VIF-p = num / den. piq's EPS is 1e-8 where vifp_mscale.m has 1e-10, and
    piq returns (num + EPS) / (den + EPS)."""
    ref, dist = _y(ref) * 255.0, _y(dist) * 255.0
    num = den = 0.0
    terms = 0
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        c = np.arange(n) - (n - 1) / 2
        win = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * (n / 5) ** 2))
        win /= win.sum()

        def filt(a):
            return signal.correlate2d(a, win, mode="valid")

        if scale > 1:
            ref, dist = filt(ref)[::2, ::2], filt(dist)[::2, ::2]
        mu1, mu2 = filt(ref), filt(dist)
        s1 = np.maximum(filt(ref * ref) - mu1 * mu1, 0)
        s2 = np.maximum(filt(dist * dist) - mu2 * mu2, 0)
        s12 = filt(ref * dist) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        g[s1 < eps] = 0
        sv[s1 < eps] = s2[s1 < eps]
        s1[s1 < eps] = 0
        g[s2 < eps] = 0
        sv[s2 < eps] = 0
        sv[g < 0] = s2[g < 0]
        g[g < 0] = 0
        sv[sv <= eps] = eps
        num += np.log10(1 + g**2 * s1 / (sv + sigma_nsq)).sum()
        den += np.log10(1 + s1 / sigma_nsq).sum()
        terms += s1.size
    return float(num), float(den), terms


def _nearest_up(images: np.ndarray, k: int) -> np.ndarray:
    return images.repeat(k, axis=1).repeat(k, axis=2)


@pytest.mark.parametrize("name", MEASURES)
def test_identical_images_score_perfect(scores, name):
    assert scores[name].dtype == np.float64
    np.testing.assert_allclose(scores[name][0], PERFECT[name], atol=1e-6)


@pytest.mark.parametrize("name", MEASURES)
@pytest.mark.parametrize("kind", KINDS)
def test_quality_falls_with_distortion_level(scores, name, kind):
    t = KINDS.index(kind)
    means = scores[name][1 + 3 * t:4 + 3 * t].mean(axis=1)
    sign = 1 if HIGHER_IS_BETTER[name] else -1
    assert sign * PERFECT[name] > sign * means[0] > sign * means[1] > sign * means[2], means


# float64 in both: a batch changes only how each per-image sum is blocked, at most one rounding per term
# of the largest (a 64x64 map for VIF), on values <= 1. In float32 that bound, 64 * 64 * 2^-23 = 4.9e-4,
# is too close to the score changes a wrong conversion makes to tell them apart
BATCH_TOL = 64 * 64 * torch.finfo(torch.float64).eps


@pytest.fixture(scope="module")
def scores64(stacks) -> dict[str, np.ndarray]:
    """Each measure on all pairs in float64, flat."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(iqa_piq, "DTYPE", torch.float64)
        return {n: getattr(iqa_piq, n)(*stacks, None) for n in MEASURES}


def test_wrapper_equals_piq_on_a_single_pair(stacks, scores64):
    ref, dist = stacks
    i = 8 * N_IMAGES + 3  # JPEG level 2, fourth image: not the first slot of the batch
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].double() / 255.0  # noqa: E731
    r, d = to_t(ref[i]), to_t(dist[i])
    ru, du = to_t(_nearest_up(ref[i:i + 1], 2)[0]), to_t(_nearest_up(dist[i:i + 1], 2)[0])
    expected = {"gmsd": piq.gmsd(d, r).item(), "fsim": piq.fsim(d, r).item(),
                "vif": piq.vif_p(du, ru).item()}
    for n in MEASURES:
        assert scores64[n][i] == pytest.approx(expected[n], rel=0, abs=BATCH_TOL), n


@pytest.mark.parametrize("name", MEASURES)
def test_batch_boundaries_do_not_change_scores(stacks, scores64, name, monkeypatch):
    ref, dist = stacks[0][-12:], stacks[1][-12:]
    monkeypatch.setattr(iqa_piq, "DTYPE", torch.float64)
    monkeypatch.setattr(iqa_piq, "BATCH", 8)  # 12 pairs: a batch of 8, then one of 4
    np.testing.assert_allclose(getattr(iqa_piq, name)(ref, dist, None), scores64[name][-12:], rtol=0, atol=BATCH_TOL)


def test_gmsd_matches_numpy_reimplementation(stacks, scores, scores64):
    expected = [gmsd_reference(a, b) for a, b in zip(*stacks)]
    for dtype, got in ((torch.float32, scores["gmsd"].ravel()), (torch.float64, scores64["gmsd"])):
        # Y, its 2x2 mean and Prewitt gradients round to ~10 eps (values <= 1); the GMS map amplifies a
        # gradient's error at most 1/sqrt(T) ~ 20x and its std moves by at most the largest change: 2 x 10 x 20
        np.testing.assert_allclose(got, expected, rtol=0, atol=400 * torch.finfo(dtype).eps, err_msg=str(dtype))


def test_vif_needs_upsampling_at_32_and_matches_numpy_reimplementation(stacks, scores, scores64):
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="41x41"):
        piq.vif_p(x, x)
    assert iqa_piq.vif_upsample_factor(32, 32) == 2
    assert iqa_piq.vif_upsample_factor(41, 64) == 1
    assert iqa_piq.vif_upsample_factor(20, 20) == 3
    assert iqa_piq.vif_upsample_factor(20, 64) == iqa_piq.vif_upsample_factor(64, 20) == 3  # the shorter side: 60
    ref, dist = _nearest_up(stacks[0], 2), _nearest_up(stacks[1], 2)
    # piq's EPS (vifp_mscale.m's 1e-10 moves these scores by 1.3e-9), so that only rounding differs
    num, den, terms = np.array([vif_reference(a, b, eps=1e-8) for a, b in zip(ref, dist)]).T
    expected = (num + 1e-8) / (den + 1e-8)
    for dtype, got in ((torch.float32, scores["vif"].ravel()), (torch.float64, scores64["vif"])):
        # a local variance E[x^2] - E[x]^2 (up to 17x17 products at the 0-255 scale) rounds to ~8 eps 255^2 17,
        # which log10(1 + s / sigma_nsq) reads at slope <= 1 / (2 ln 10); 2 x terms of random sign, over den
        tol = 8 * torch.finfo(dtype).eps * 255**2 * 17 / (2 * np.log(10)) * np.sqrt(2 * terms) / den
        assert (np.abs(got - expected) <= tol).all(), (dtype, np.abs(got - expected).max(), tol.min())


def test_vif_takes_the_reference_as_reference(images):
    """VIF is asymmetric: more contrast than the reference scores above 1, less below 1."""
    low = np.floor(128 + (images.astype(np.float64) - 128) * 0.7 + 0.5).astype(np.uint8)
    s = iqa_piq.vif(np.concatenate([low, images]), np.concatenate([images, low]), None)
    assert (s[:N_IMAGES] > 1.05).all() and (s[N_IMAGES:] < 0.95).all(), s


def test_rejects_mismatched_or_non_uint8_stacks(images):
    with pytest.raises(ValueError, match="differ in shape"):
        iqa_piq.gmsd(images, images[:-1], None)
    with pytest.raises(ValueError, match="uint8"):
        iqa_piq.fsim(images.astype(np.float32), images.astype(np.float32), None)
    for bad in (images[..., 0], images[..., :1], np.concatenate([images, images[..., :1]], -1)):  # RGB only
        with pytest.raises(ValueError, match=r"expected uint8 \(N, H, W, 3\) RGB stacks"):
            iqa_piq.vif(bad, bad, None)
