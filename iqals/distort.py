"""Blur, noise and JPEG at three levels: one fixed, seeded realisation per image, type and level.

Of whole stacks, in the conventions params.yaml's `distort` names (docs/protocol.md, "Where the paper is silent");
by default Gaussian blur of kernel size 2*ceil(2 sigma)+1 with replicated borders (MATLAB imgaussfilt), noise
x/255 + N(0, v) clipped to [0, 1] and rounded to uint8 (MATLAB imnoise), and JPEG by OpenCV's libjpeg(-turbo) at
4:2:0. The other conventions measure how much the paper's silence matters (the deviation study).
"""
from __future__ import annotations

import io
import math

import cv2
import numpy as np
from PIL import Image

from .params import DISTORTIONS, LEVELS, Distort
from .seeds import derive_seed, image_streams

_CV_BORDER = {"replicate": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """Round half up and saturate, as MATLAB's uint8 conversion does for non-negative values."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def kernel_radius(sigma: float, rule: str) -> int:
    """Half the kernel size under each rule of distort.blur_kernel (params.Distort)."""
    if rule == "matlab":    # imgaussfilt: 2*ceil(2 sigma)+1
        return math.ceil(2 * sigma)
    if rule == "scipy":     # ndimage.gaussian_filter, truncate 4: radius int(4 sigma + 0.5)
        return int(4 * sigma + 0.5)
    if rule == "opencv":    # GaussianBlur on 8-bit images with ksize 0: cvRound(6 sigma + 1) | 1
        return (round(6 * sigma + 1) | 1) // 2
    if rule == "fixed3":    # fspecial('gaussian', [3 3], sigma), its default size
        return 1
    raise ValueError(f"blur kernel rule {rule!r}: expected one of matlab, scipy, opencv, fixed3")


def gaussian_kernel(sigma: float, rule: str) -> np.ndarray:
    """The sampled Gaussian of size 2*kernel_radius+1, normalised to sum 1."""
    radius = kernel_radius(sigma, rule)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def blur(images: np.ndarray, sigma: float, rule: str, border: str) -> np.ndarray:
    """Gaussian blur of a (N, H, W, 3) uint8 stack, image by image in float64, then rounded. `reflect` mirrors
    without repeating the edge pixel (OpenCV's BORDER_REFLECT_101); `constant` pads zeros (imfilter's default)."""
    k, b = gaussian_kernel(sigma, rule), _CV_BORDER[border]
    out = np.empty_like(images)
    for im, dst in zip(images, out):
        dst[:] = _round_uint8(cv2.sepFilter2D(im.astype(np.float64), cv2.CV_64F, k, k, borderType=b))
    return out


def noise(images: np.ndarray, var: float, seed: int, index: np.ndarray | None = None, scale: str = "unit",
          output: str = "round", field: str = "per_channel") -> np.ndarray:
    """Additive white Gaussian noise of variance `var` on the [0, 1] ("unit") or [0, 255] ("byte") scale, per RGB
    value or shared by the channels; `output` rounds or floors to uint8 after clipping to [0, 1], float_clipped only
    clips, float neither (float32 on [0, 255]). Streams are keyed by official position: subsets get the same noise."""
    sd = math.sqrt(var) / (255.0 if scale == "byte" else 1.0)
    shape = images.shape[1:] if field == "per_channel" else images.shape[1:-1] + (1,)
    out = np.empty(images.shape, np.uint8 if output in ("round", "floor") else np.float32)
    for i, (im, rng) in enumerate(zip(images, image_streams(seed, len(images), index, "noise"))):
        y = im / 255.0 + sd * rng.standard_normal(shape)
        y = (y if output == "float" else np.clip(y, 0.0, 1.0)) * 255.0
        out[i] = _round_uint8(y) if output == "round" else np.floor(y) if output == "floor" else y
    return out


def jpeg(images: np.ndarray, quality: int, subsampling: str, encoder: str = "opencv") -> np.ndarray:
    """JPEG round trip of a stack with OpenCV or Pillow, image by image."""
    flags = [cv2.IMWRITE_JPEG_QUALITY, int(quality),
             cv2.IMWRITE_JPEG_SAMPLING_FACTOR, getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{subsampling}")]
    out = np.empty_like(images)
    for im, dst in zip(images, out):
        if encoder == "pillow":
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=int(quality),
                                     subsampling={"444": 0, "422": 1, "420": 2}[subsampling])  # Pillow's codes
            dst[:] = np.asarray(Image.open(buf).convert("RGB"))
            continue
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR), flags)  # OpenCV wants BGR
        if not ok:
            raise RuntimeError(f"OpenCV could not JPEG-encode at quality {quality}")
        cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB, dst=dst)
    return out


def distort_all(images: np.ndarray, cfg: Distort, seed: int, split: str, index=None, progress=None) -> np.ndarray:
    """Every type at every level of a stack: (types, LEVELS, N, H, W, 3), in DISTORTIONS order; uint8, or float32
    on [0, 255] under a float noise output (cfg.uint8). `index` (official positions, default 0..N-1) keys the noise."""
    out = np.empty((len(DISTORTIONS), LEVELS) + images.shape, dtype=np.uint8 if cfg.uint8 else np.float32)
    for t, kind in enumerate(DISTORTIONS):
        for lv in range(LEVELS):
            if kind == "blur":
                out[t, lv] = blur(images, cfg.blur_sigma[lv], cfg.blur_kernel, cfg.blur_border)
            elif kind == "noise":
                out[t, lv] = noise(images, cfg.noise_var[lv], derive_seed(seed, "noise", split, lv), index,
                                   cfg.noise_scale, cfg.noise_output, cfg.noise_field)
            else:
                out[t, lv] = jpeg(images, cfg.jpeg_quality[lv], cfg.jpeg_subsampling, cfg.jpeg_encoder)
            if progress is not None:
                progress.update(1)
    return out
