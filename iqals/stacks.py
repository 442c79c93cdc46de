"""Per-image scores of distorted stacks against references, in batches (for iqa.py, iqa_piq.py), and per-level
summaries of grids of stacks (distort, score and corrupt stages); no torch or IQA code: the distort and corrupt
stages report PSNR without depending on iqa.py.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .params import test_set_name

BATCH = 2048  # images per PSNR batch: the float64 copies of 2048 images take 50 MB


def check_pair(ref, dist) -> None:
    if np.shape(ref) != np.shape(dist):
        raise ValueError(f"reference {np.shape(ref)} and distorted {np.shape(dist)} stacks differ in shape")


def per_image(fn: Callable, ref: np.ndarray, dist: np.ndarray, batch: int, convert=np.asarray) -> np.ndarray:
    """fn(convert(refs), convert(dists)) over `batch` images at a time: one float64 per image."""
    check_pair(ref, dist)
    out = np.empty(len(ref), dtype=np.float64)
    for i in range(0, len(ref), batch):
        out[i:i + batch] = np.asarray(fn(convert(ref[i:i + batch]), convert(dist[i:i + batch])))
    return out


def _psnr(ref: np.ndarray, dist: np.ndarray) -> np.ndarray:
    mse = ((ref.astype(np.float64) - dist.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return np.minimum(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)), 100.0)


def psnr(ref: np.ndarray, dist: np.ndarray, cfg=None) -> np.ndarray:
    """PSNR in dB over all RGB values of each image of uint8 (N, H, W, 3) stacks, capped at
    100 dB (identical images). `cfg` is not read: the signature of iqa.METRICS."""
    return per_image(_psnr, ref, dist, BATCH)


def per_level(grid: np.ndarray, fn: Callable, name: Callable = test_set_name) -> dict:
    """{name(i, j): fn(grid[i, j])} over a grid's first two axes (by default types x levels, named blur_1, ...)."""
    return {name(i, j): fn(grid[i, j]) for i in range(grid.shape[0]) for j in range(grid.shape[1])}


def mean_psnr(ref: np.ndarray, grid: np.ndarray, name: Callable = test_set_name) -> dict:
    """{name: {"psnr_db": mean PSNR}} of every stack of a (A, B, N, H, W, 3) grid against ref."""
    return per_level(grid, lambda d: {"psnr_db": round(float(psnr(ref, d).mean()), 4)}, name)
