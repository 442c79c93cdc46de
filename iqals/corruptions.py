"""CIFAR-10-C style corruptions of the test set, for evaluation only (never used in training).

Ports of Hendrycks & Dietterich's make_cifar_c.py (ICLR 2019; github.com/hendrycks/robustness, ImageNet-C/create_c:
"the original") with its 32x32 constants, not the 224x224 ones of `imagecorruptions`. Deliberately unlike it:
- randomness: one stream per image, keyed by (seed, family, severity, official position): see `corrupt`;
- motion_blur: a float64 port of ImageMagick's MotionBlurImage kernel, not ImageMagick (Wand);
- impulse_noise: per-value Bernoulli salt-and-pepper, as scikit-image >= 0.19 random_noise does;
- uint8 output rounds half up (the original truncates: 0.8 * 255 = 203.99999... becomes 203).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from .params import CORRUPTIONS
from .seeds import derive_seed, image_streams

SIZE = 32  # the constants below are for 32x32 images (CIFAR-10); other sizes are refused
SEVERITIES = (1, 2, 3, 4, 5)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.py disk(): a normalised disk, anti-aliased by a 3x3 Gaussian (radius <= 8)."""
    L = np.arange(-8, 8 + 1)
    X, Y = np.meshgrid(L, L)
    d = np.array((X**2 + Y**2) <= radius**2, dtype=np.float32)
    d /= d.sum()
    k = cv2.GaussianBlur(d, ksize=(3, 3), sigmaX=alias_blur)
    rows, cols = np.nonzero(k)  # crop the zeros of the 17x17 support (same filter, faster)
    r = max(8 - rows.min(), rows.max() - 8, 8 - cols.min(), cols.max() - 8)
    return k[8 - r:9 + r, 8 - r:9 + r].astype(np.float64)


def _plasma_fractal(rng: np.random.Generator, wibbledecay: float, mapsize: int = SIZE) -> np.ndarray:
    """make_cifar_c.py plasma_fractal(): diamond-square heightmap in [0, 1] (np.random -> rng)."""
    m = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbledmean(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        h = step // 2
        ul = m[::step, ::step]  # fillsquares
        sq = ul + np.roll(ul, shift=-1, axis=0)
        sq += np.roll(sq, shift=-1, axis=1)
        dr = m[h::step, h::step] = wibbledmean(sq)
        m[::step, h::step] = wibbledmean(dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1))  # filldiamonds
        m[h::step, ::step] = wibbledmean(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0))
        step //= 2
        wibble /= wibbledecay
    m -= m.min()
    return m / m.max()


def defocus_blur(x, c, rngs):
    """make_cifar_c.py defocus_blur: disk(radius=c[0], alias_blur=c[1]), cv2.filter2D (BORDER_REFLECT_101: 'mirror')."""
    k = _disk(*c)[None, :, :, None]
    return np.clip(ndimage.correlate(x, k, mode="mirror"), 0, 1) * 255


def _motion_kernel(radius: float, sigma: float, angle_deg: float) -> tuple[np.ndarray, list]:
    """ImageMagick MotionBlurImage (effect.c): 2*ceil(radius)+1 taps of a one-sided Gaussian exp(-i^2 / (2 sigma^2)),
    normalised; tap i reads the pixel at (x + ceil(i cos(a) - 0.5), y + ceil(i sin(a) - 0.5))."""
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    w = np.exp(-(i * i) / (2 * sigma * sigma))
    px, py = width * math.sin(math.radians(angle_deg)), width * math.cos(math.radians(angle_deg))
    h = math.hypot(px, py)
    offs = [(math.ceil(k * py / h - 0.5), math.ceil(k * px / h - 0.5)) for k in range(width)]  # (dx, dy)
    return w / w.sum(), offs


def motion_blur(x, c, rngs):
    """make_cifar_c.py motion_blur: Wand motion_blur(radius=c[0], sigma=c[1], angle=U(-45, 45)); borders replicated
    (ImageMagick's default 'edge' virtual pixels), rounded to 8 bits as its PNG output is."""
    r = int(2 * math.ceil(c[0]))  # largest offset is width - 1
    pad = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    for n, rng in enumerate(rngs):
        w, offs = _motion_kernel(c[0], c[1], rng.uniform(-45, 45))
        for wi, (dx, dy) in zip(w, offs):
            out[n] += wi * pad[n, r + dy:r + dy + x.shape[1], r + dx:r + dx + x.shape[2]]
    return np.floor(np.clip(out, 0, 1) * 255 + 0.5)


def shot_noise(x, c, rngs):
    """make_cifar_c.py shot_noise: Poisson(x * c) / c; c photons per unit intensity (fewer: noisier)."""
    return np.stack([np.clip(rng.poisson(xi * c) / c, 0, 1) * 255 for xi, rng in zip(x, rngs)])


def impulse_noise(x, c, rngs):
    """make_cifar_c.py impulse_noise, skimage random_noise(mode='s&p', amount=c): a value becomes 1 or 0 w.p. c."""
    out = x.copy()
    for xi, rng in zip(out, rngs):
        flipped, salted = rng.random(xi.shape) < c, rng.random(xi.shape) < 0.5
        xi[flipped & salted], xi[flipped & ~salted] = 1.0, 0.0
    return out * 255


def contrast(x, c, rngs):
    """make_cifar_c.py contrast: (x - channel mean) * c + channel mean."""
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def fog(x, c, rngs):
    """make_cifar_c.py fog: x + c[0] * plasma_fractal(wibbledecay=c[1]), rescaled by the image's maximum."""
    out = np.empty_like(x)
    for n, rng in enumerate(rngs):
        max_val = x[n].max()
        f = x[n] + c[0] * _plasma_fractal(rng, c[1])[..., None]
        out[n] = np.clip(f * max_val / (max_val + c[0]), 0, 1) * 255
    return out


def pixelate(x, c, rngs):
    """make_cifar_c.py pixelate: Pillow BOX resize to int(32 c) pixels a side, then back to 32."""
    n = int(SIZE * c)
    return np.stack([np.asarray(Image.fromarray(im).resize((n, n), Image.BOX).resize((SIZE, SIZE), Image.BOX))
                     for im in np.floor(x * 255 + 0.5).astype(np.uint8)]).astype(np.float64)


def elastic_transform(x, c, rngs):
    """make_cifar_c.py elastic_transform (after gist erniejunior/601cdf56d2b424757de5): an affine map of random corner
    shifts U(-c[2], c[2]), then U(-1, 1) displacements smoothed by a Gaussian of sigma c[1] (truncate 3) times c[0]."""
    alpha, sigma, shift = c
    shape = x.shape[1:]
    centre = np.float32(shape[:2]) // 2
    size = min(shape[:2]) // 3
    pts1 = np.float32([centre + size, [centre[0] + size, centre[1] - size], centre - size])
    xx, yy, zz = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    out = np.empty_like(x)
    for n, rng in enumerate(rngs):
        m = cv2.getAffineTransform(pts1, pts1 + rng.uniform(-shift, shift, size=pts1.shape).astype(np.float32))
        im = cv2.warpAffine(x[n].astype(np.float32), m, shape[1::-1], borderMode=cv2.BORDER_REFLECT_101)
        dx, dy = ((ndimage.gaussian_filter(rng.uniform(-1, 1, size=shape[:2]), sigma, mode="reflect", truncate=3)
                   * alpha).astype(np.float32)[..., None] for _ in range(2))
        coords = np.stack([yy + dy, xx + dx, zz.astype(np.float32)])
        out[n] = np.clip(ndimage.map_coordinates(im, coords, order=1, mode="reflect"), 0, 1) * 255
    return out


# family -> (function, its constants c of severities 1..5 in make_cifar_c.py), in params.CORRUPTIONS order; each
# function maps float64 (n, 32, 32, 3) in [0, 1], c and one Generator per image to float64 in [0, 255].
FAMILIES: dict[str, tuple[Callable, tuple[Any, ...]]] = dict(zip(CORRUPTIONS, (
    (defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))),
    (motion_blur, ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))),
    (shot_noise, (500, 250, 100, 75, 50)),
    (impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    (contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    (fog, ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))),
    (pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
    # in pixels: IMSIZE * (alpha, sigma, affine shift) with IMSIZE = 32
    (elastic_transform, tuple((SIZE * a, SIZE * s, SIZE * d) for a, s, d in (
        (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)))),
), strict=True))


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != (SIZE, SIZE, 3):
        raise ValueError(f"corrupt: expected uint8 images of shape (N, {SIZE}, {SIZE}, 3), got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")


def corrupt(images: np.ndarray, family: str, severity: int, seed: int, index: np.ndarray | None = None) -> np.ndarray:
    """One family at one severity (1..5) of a uint8 (N, 32, 32, 3) stack -> uint8, same shape.

    Image i draws from a Philox stream keyed by (derive_seed(seed, "corrupt", family, severity), index[i]), `index`
    being its position in the official split (default 0..N-1): the result depends on neither N nor family order.
    """
    _check_images(images)
    if family not in FAMILIES:
        raise ValueError(f"corrupt: unknown family {family!r}; known: {list(FAMILIES)}")
    if severity not in SEVERITIES:
        raise ValueError(f"corrupt: severity {severity!r} not in {list(SEVERITIES)}")
    rngs = image_streams(derive_seed(seed, "corrupt", family, severity), len(images), index, "corrupt")
    fn, consts = FAMILIES[family]
    return np.clip(np.floor(fn(images / 255.0, consts[severity - 1], rngs) + 0.5), 0, 255).astype(np.uint8)


def corrupt_all(images: np.ndarray, families, severities, seed: int, index: np.ndarray | None = None,
                progress=None) -> np.ndarray:
    """Every family x severity: uint8 (F, S, N, 32, 32, 3), in the given orders."""
    _check_images(images)
    out = np.empty((len(families), len(severities)) + images.shape, dtype=np.uint8)
    for f, family in enumerate(families):
        for s, severity in enumerate(severities):
            out[f, s] = corrupt(images, family, severity, seed, index)
            if progress is not None:
                progress.update(1)
    return out
