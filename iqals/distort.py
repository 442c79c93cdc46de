"""Blur, noise and JPEG at three levels: one fixed, seeded realisation per image, type and level.

Batched over the whole image stack (PROTOCOL.md, "Where the paper is silent"):
- blur: Gaussian, kernel size 2*ceil(truncate*sigma)+1, border from params (MATLAB imgaussfilt);
- noise: x/255 + N(0, v), clipped to [0, 1], rounded to uint8 (MATLAB imnoise);
- JPEG: OpenCV's libjpeg(-turbo) encoder at the given quality and chroma subsampling.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .params import DISTORTIONS, Distort
from .seeds import derive_seed

CHUNK = 4096  # images per batch: bounds the float working memory
_TORCH_PAD = {"replicate": "replicate", "reflect": "reflect", "constant": "constant"}
_CV_SUBSAMPLING = {"420": "IMWRITE_JPEG_SAMPLING_FACTOR_420",
                   "422": "IMWRITE_JPEG_SAMPLING_FACTOR_422",
                   "444": "IMWRITE_JPEG_SAMPLING_FACTOR_444"}


def _round_uint8(x: torch.Tensor | np.ndarray):
    """Round half up and saturate, as MATLAB's uint8 conversion does for non-negative values."""
    if isinstance(x, torch.Tensor):
        return torch.floor(x + 0.5).clamp_(0, 255).to(torch.uint8)
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    radius = math.ceil(truncate * sigma)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def blur(images: np.ndarray, sigma: float, truncate: float, border: str) -> np.ndarray:
    """Separable Gaussian blur of a (N, H, W, 3) uint8 stack."""
    k = torch.from_numpy(gaussian_kernel(sigma, truncate)).to(torch.float64)
    r = len(k) // 2
    out = np.empty_like(images)
    for i in range(0, len(images), CHUNK):
        x = torch.from_numpy(images[i:i + CHUNK]).permute(0, 3, 1, 2).to(torch.float64)
        n, c, h, w = x.shape
        x = F.pad(x.reshape(n * c, 1, h, w), (r, r, r, r), mode=_TORCH_PAD[border])
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = F.conv2d(x, k.view(1, 1, -1, 1))
        out[i:i + CHUNK] = _round_uint8(x.reshape(n, c, h, w).permute(0, 2, 3, 1)).numpy()
    return out


def noise(images: np.ndarray, var: float, seed: int) -> np.ndarray:
    """Additive white Gaussian noise of variance `var` on the [0, 1] scale."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    for i in range(0, len(images), CHUNK):
        x = images[i:i + CHUNK].astype(np.float64) / 255.0
        x += rng.standard_normal(x.shape) * math.sqrt(var)
        out[i:i + CHUNK] = _round_uint8(np.clip(x, 0.0, 1.0) * 255.0)
    return out


def jpeg_one(image: np.ndarray, quality: int, subsampling: str) -> np.ndarray:
    """Encode and decode one RGB uint8 image with OpenCV."""
    flags = [cv2.IMWRITE_JPEG_QUALITY, int(quality),
             cv2.IMWRITE_JPEG_SAMPLING_FACTOR, getattr(cv2, _CV_SUBSAMPLING[subsampling])]
    ok, buf = cv2.imencode(".jpg", image[..., ::-1], flags)  # OpenCV wants BGR
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode at quality {quality}")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


def jpeg(images: np.ndarray, quality: int, subsampling: str, workers: int = 4) -> np.ndarray:
    """JPEG round trip of a stack; OpenCV releases the GIL, so threads use every core."""
    out = np.empty_like(images)
    step = max(1, math.ceil(len(images) / (4 * workers)))

    def work(lo: int) -> None:
        for j in range(lo, min(lo + step, len(images))):
            out[j] = jpeg_one(images[j], quality, subsampling)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, range(0, len(images), step)))
    return out


def distort_all(images: np.ndarray, cfg: Distort, seed: int, split: str, progress=None) -> np.ndarray:
    """All 3 types x 3 levels of a stack: uint8 (3, 3, N, H, W, 3), in DISTORTIONS order."""
    out = np.empty((len(DISTORTIONS), 3) + images.shape, dtype=np.uint8)
    for t, kind in enumerate(DISTORTIONS):
        for lv in range(3):
            if kind == "blur":
                out[t, lv] = blur(images, cfg.blur_sigma[lv], cfg.blur_truncate, cfg.blur_border)
            elif kind == "noise":
                out[t, lv] = noise(images, cfg.noise_var[lv], derive_seed(seed, "noise", split, lv))
            else:
                out[t, lv] = jpeg(images, cfg.jpeg_quality[lv], cfg.jpeg_subsampling)
            if progress is not None:
                progress.update(1)
    return out
