"""Full-reference quality scores s(x) of distorted images and the map T into (0, 1].

`METRICS[name](ref, dist, cfg)` takes uint8 (N, H, W, 3) RGB stacks and returns float64 (N,).
Adding a measure means adding it here; the training code only sees scores.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from .params import IQA

BATCH = 2048  # images per batch


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Y = 0.299 R + 0.587 G + 0.114 B of (N, H, W, 3) uint8 values, as float32 (N, H, W)."""
    x = rgb.to(torch.float32)
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


@lru_cache(maxsize=8)
def _valid_gaussian_matrix(size: int, win: int, sigma: float) -> torch.Tensor:
    """(size-win+1, size) matrix G such that G @ X @ G.T is the valid Gaussian filtering of X."""
    r = win // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    g = np.zeros((size - win + 1, size))
    for i in range(size - win + 1):
        g[i, i:i + win] = k
    return torch.from_numpy(g)


def ssim_y(ref: torch.Tensor, dist: torch.Tensor, win: int, sigma: float, k1: float, k2: float,
           data_range: float) -> torch.Tensor:
    """Mean SSIM over the valid region of (N, H, W) float64 luminance images (Wang et al. 2004).

    The separable Gaussian window is applied as two small matrix products, which batch far
    better on CPU than a convolution with an 11-tap kernel.
    """
    n, h, w = ref.shape
    gh = _valid_gaussian_matrix(h, win, sigma).to(ref.dtype)
    gw = _valid_gaussian_matrix(w, win, sigma).to(ref.dtype)
    # Shift both images by the reference's mean: (co)variances are unchanged and float32
    # loses far less to cancellation in E[x^2] - E[x]^2; the means get the shift back below.
    shift = ref.mean(dim=(1, 2), keepdim=True)
    ref, dist = ref - shift, dist - shift
    # Filter the five maps in one go: rows, then columns, each as one flat GEMM.
    z = torch.stack([ref, dist, ref * ref, dist * dist, ref * dist])  # (5, N, H, W)
    z = (z.reshape(-1, w) @ gw.T).reshape(5, n, h, -1).transpose(2, 3)  # (5, N, W', H)
    z = (z.reshape(-1, h) @ gh.T).reshape(5, n, gw.shape[0], gh.shape[0])  # (5, N, W', H')
    mx, my, exx, eyy, exy = z
    sxx, syy, sxy = exx - mx * mx, eyy - my * my, exy - mx * my
    mx, my = mx + shift, my + shift
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.double().mean(dim=(1, 2))


def _batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    def score(ref: np.ndarray, dist: np.ndarray, cfg: IQA) -> np.ndarray:
        if ref.shape != dist.shape:
            raise ValueError(f"reference {ref.shape} and distorted {dist.shape} stacks differ in shape")
        out = np.empty(len(ref), dtype=np.float64)
        for i in range(0, len(ref), BATCH):
            r = torch.from_numpy(np.ascontiguousarray(ref[i:i + BATCH]))
            d = torch.from_numpy(np.ascontiguousarray(dist[i:i + BATCH]))
            out[i:i + BATCH] = fn(r, d, cfg).numpy()
        return out
    return score


@_batched
def ssim(ref, dist, cfg: IQA):
    s = cfg.ssim
    return ssim_y(luminance(ref), luminance(dist), s.win_size, s.sigma, s.k1, s.k2, s.data_range)


@_batched
def psnr(ref, dist, cfg: IQA):
    """PSNR in dB over all RGB values (infinite for identical images, capped at 100 dB)."""
    mse = ((ref.to(torch.float64) - dist.to(torch.float64)) ** 2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))).clamp_max(100.0)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, IQA], np.ndarray]] = {
    "ssim": ssim,
    "psnr": psnr,
}

# T: measure -> (0, 1], before the clip to iqa.clip (PROTOCOL.md: identity for SSIM).
TRANSFORMS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "identity": lambda s, scale: s,
    "linear": lambda s, scale: s / scale,              # e.g. PSNR / 50 dB
    "exp_decay": lambda s, scale: np.exp(-s / scale),  # for distances, 0 = identical (GMSD)
}


def target_probability(scores: np.ndarray, cfg: IQA) -> np.ndarray:
    """T(s) clipped to iqa.clip: the true-class probability of Eq. (2)."""
    t = TRANSFORMS[cfg.transform](np.asarray(scores, dtype=np.float64), cfg.transform_scale)
    return np.clip(t, cfg.clip[0], cfg.clip[1])
