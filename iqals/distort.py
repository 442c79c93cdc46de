"""Blur, noise and JPEG at three levels: one fixed, seeded realisation per image, type and level.

Over a whole image stack (PROTOCOL.md, "Where the paper is silent"):
- blur: Gaussian, kernel size 2*ceil(truncate*sigma)+1, border from params (MATLAB imgaussfilt);
- noise: x/255 + N(0, v), clipped to [0, 1], rounded to uint8 (MATLAB imnoise);
- JPEG: OpenCV's libjpeg(-turbo) encoder at the given quality and chroma subsampling.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .params import DISTORTIONS, LEVELS, Distort
from .seeds import derive_seed, image_streams

_CV_BORDER = {"replicate": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101,
              "constant": cv2.BORDER_CONSTANT}


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """Round half up and saturate, as MATLAB's uint8 conversion does for non-negative values."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """MATLAB imgaussfilt's kernel: size 2*ceil(truncate*sigma)+1, normalised to sum 1."""
    radius = math.ceil(truncate * sigma)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def blur(images: np.ndarray, sigma: float, truncate: float, border: str) -> np.ndarray:
    """Gaussian blur of a (N, H, W, 3) uint8 stack, image by image in float64, then rounded.

    `reflect` mirrors without repeating the edge pixel (OpenCV's BORDER_REFLECT_101).
    """
    k, b = gaussian_kernel(sigma, truncate), _CV_BORDER[border]
    out = np.empty_like(images)
    for im, dst in zip(images, out):
        dst[:] = _round_uint8(cv2.sepFilter2D(im.astype(np.float64), cv2.CV_64F, k, k, borderType=b))
    return out


def noise(images: np.ndarray, var: float, seed: int, index: np.ndarray | None = None) -> np.ndarray:
    """Additive white Gaussian noise of variance `var` on the [0, 1] scale.

    Image i's noise comes from its stream image_streams(seed, ...)[i], keyed by its position in
    the official set, so an image gets the same noise in a subset as in the full set.
    """
    sd = math.sqrt(var)
    out = np.empty_like(images)
    for i, (im, rng) in enumerate(zip(images, image_streams(seed, len(images), index, "noise"))):
        out[i] = _round_uint8(np.clip(im / 255.0 + sd * rng.standard_normal(im.shape), 0.0, 1.0) * 255.0)
    return out


def jpeg(images: np.ndarray, quality: int, subsampling: str) -> np.ndarray:
    """JPEG round trip of a stack with OpenCV, image by image."""
    flags = [cv2.IMWRITE_JPEG_QUALITY, int(quality),
             cv2.IMWRITE_JPEG_SAMPLING_FACTOR, getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{subsampling}")]
    out = np.empty_like(images)
    for im, dst in zip(images, out):
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR), flags)  # OpenCV wants BGR
        if not ok:
            raise RuntimeError(f"OpenCV could not JPEG-encode at quality {quality}")
        cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB, dst=dst)
    return out


def distort_all(images: np.ndarray, cfg: Distort, seed: int, split: str, index=None,
                progress=None) -> np.ndarray:
    """Every type at every level of a stack: uint8 (types, LEVELS, N, H, W, 3), in DISTORTIONS order.

    `index`: each image's position in the official split (default 0..N-1), keys its noise.
    """
    out = np.empty((len(DISTORTIONS), LEVELS) + images.shape, dtype=np.uint8)
    for t, kind in enumerate(DISTORTIONS):
        for lv in range(LEVELS):
            if kind == "blur":
                out[t, lv] = blur(images, cfg.blur_sigma[lv], cfg.blur_truncate, cfg.blur_border)
            elif kind == "noise":
                out[t, lv] = noise(images, cfg.noise_var[lv], derive_seed(seed, "noise", split, lv), index)
            else:
                out[t, lv] = jpeg(images, cfg.jpeg_quality[lv], cfg.jpeg_subsampling)
            if progress is not None:
                progress.update(1)
    return out
