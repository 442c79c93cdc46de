"""Full-reference quality scores s(x) of distorted images and the map T into (0, 1].

`METRICS[name](ref, dist, cfg)` maps uint8 (N, H, W, 3) RGB stacks to float64 (N,); `score_all` scores many
versions of the same references at once. Adding a measure means adding it here; the training code only sees scores.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import iqa_piq, stacks
from .params import IQA, IQA_METRICS, IQA_TRANSFORMS, SSIM

# references per SSIM chunk: it bounds the float64 intermediates, a few alive at once (the versions'
# chunk in RGB: V x CHUNK x H x W x 3 x 8 bytes, 57 MB for 9 versions of 32x32 images)
CHUNK = 256
LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601 weights of R, G, B


def _valid_filter(size: int, win: int, sigma: float) -> torch.Tensor:
    """(size - win + 1, size) float64 matrix G of the Gaussian window's "valid" part: G @ m filters the columns
    of m. skimage filters the whole image, then crops (win - 1) / 2 wide borders: exactly these values are left."""
    if win > size:
        raise ValueError(f"SSIM window {win} is larger than the {size}-pixel image side")
    x = torch.arange(win, dtype=torch.float64) - win // 2
    k = torch.exp(-x**2 / (2 * sigma**2))
    g = torch.zeros(size - win + 1, size, dtype=torch.float64)
    for i in range(len(g)):
        g[i, i:i + win] = k / k.sum()
    return g


def ssim_many(ref: np.ndarray, dists: np.ndarray, p: SSIM) -> np.ndarray:
    """Mean SSIM (Wang et al. 2004; skimage's gaussian_weights=True, use_sample_covariance=False) on float64 Y of
    uint8 versions (V, N, H, W, 3) against references (N, H, W, 3): float64 (V, N), each reference filtered once."""
    ref, dists = np.asarray(ref), np.asarray(dists)
    if dists.ndim != 5 or dists.shape[1:] != ref.shape or ref.shape[-1] != 3:
        raise ValueError(f"versions {dists.shape} do not match references {ref.shape} "
                         "(expected (V, N, H, W, 3) and (N, H, W, 3))")
    gh, gw = (_valid_filter(n, p.win_size, p.sigma) for n in ref.shape[1:3])
    c1, c2 = (p.k1 * p.data_range) ** 2, (p.k2 * p.data_range) ** 2
    out = np.empty(dists.shape[:2])

    def f(m):  # the separable Gaussian as two matrix products, over all maps at once
        return gh @ m @ gw.T

    for i in range(0, len(ref), CHUNK):
        x, y = (torch.from_numpy(a[..., i:i + CHUNK, :, :, :] @ LUMA) for a in (ref, dists))
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out[:, i:i + CHUNK] = s.mean((-2, -1)).numpy()
    return out


def ssim(ref: np.ndarray, dist: np.ndarray, cfg: IQA) -> np.ndarray:
    """Mean SSIM of each distorted image against its reference, on luminance: float64 (N,)."""
    stacks.check_pair(ref, dist)
    return ssim_many(ref, np.asarray(dist)[None], cfg.ssim)[0]


# params.IQA_METRICS names them (validating params must not import this module), in this order
METRICS: dict[str, Callable[[np.ndarray, np.ndarray, IQA], np.ndarray]] = dict(zip(
    IQA_METRICS, (ssim, iqa_piq.gmsd, iqa_piq.fsim, iqa_piq.vif, stacks.psnr), strict=True))


def score_all(ref: np.ndarray, dists: np.ndarray, cfg: IQA) -> np.ndarray:
    """cfg.metric of every version (V, N, H, W, 3) against its reference (N, H, W, 3): (V, N)."""
    if cfg.metric == "ssim":  # the reference's filtered maps serve all V versions
        return ssim_many(ref, dists, cfg.ssim)
    if cfg.metric not in METRICS:
        raise ValueError(f"iqa.metric {cfg.metric!r}: not in iqals.iqa.METRICS {sorted(METRICS)}")
    return np.stack([METRICS[cfg.metric](ref, d, cfg) for d in dists])


# T: measure -> (0, 1], before the clip to iqa.clip (docs/protocol.md: identity for SSIM).
TRANSFORMS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = dict(zip(IQA_TRANSFORMS, (
    lambda s, scale: s,                  # identity
    lambda s, scale: s / scale,          # linear, e.g. PSNR / 50 dB
    lambda s, scale: np.exp(-s / scale),  # exp_decay, for distances where 0 = identical (GMSD)
), strict=True))


def target_probability(scores: np.ndarray, cfg: IQA) -> np.ndarray:
    """T(s) clipped to iqa.clip: the true-class probability of Eq. (2)."""
    return np.clip(TRANSFORMS[cfg.transform](np.asarray(scores, dtype=np.float64), cfg.transform_scale), *cfg.clip)


def summary(s: np.ndarray, cfg: IQA) -> dict:
    """The distribution of the scores s of one level, of their targets T(s), and how many
    targets the clip to iqa.clip changed (docs/protocol.md: the score stage reports it)."""
    t = TRANSFORMS[cfg.transform](np.asarray(s, dtype=np.float64), cfg.transform_scale)
    q = np.clip(t, cfg.clip[0], cfg.clip[1])
    stats = {"mean": s.mean(), "std": s.std(), "p05": np.percentile(s, 5), "median": np.median(s),
             "p95": np.percentile(s, 95), "target_mean": q.mean()}
    return {**{k: round(float(v), 5) for k, v in stats.items()}, "clipped": int(np.sum(q != t))}
