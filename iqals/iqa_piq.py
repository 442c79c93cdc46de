"""GMSD, FSIM and VIF (pixel domain) from piq, batched, with the signature of `iqa.METRICS`'s functions.

Each maps uint8 (N, H, W, 3) RGB stacks `ref` (pristine) and `dist` to float64 (N,) and does not read `cfg`; piq
gets x / 255, BATCH images at a time, reduction='none'. docs/quality_measures.md gives each measure's range,
transform and per-level means, why VIF upsamples, float32's precision and speed, and why no no-reference measure.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import stacks
from .params import IQA

BATCH = 512             # images per piq call (VIF at 64x64 holds ~25 float32 maps per image)
DTYPE = torch.float32   # float64: several times slower for small differences (docs/quality_measures.md)
FSIM_CHROMATIC = True   # FSIMc: phase congruency and gradients on Y, plus the I/Q chroma terms
VIF_MIN_SIZE = 41       # piq.vif_p refuses smaller images: its 4-scale pyramid needs 41 pixels


def _piq():
    """piq, imported on first use: ssim and psnr never need it, and the GPU machine lacks it."""
    try:
        import piq
    except ImportError as e:
        raise ImportError(f"iqa.metric gmsd, fsim and vif need the package piq ({e}); ssim and psnr do not") from None
    return piq


def vif_upsample_factor(height: int, width: int) -> int:
    """Smallest integer factor k with k * min(height, width) >= VIF_MIN_SIZE (2 for 32x32)."""
    return max(1, math.ceil(VIF_MIN_SIZE / min(height, width)))


def _batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """fn(ref, dist) on DTYPE [0, 1] (B, 3, H, W) tensors, applied to uint8 stacks in batches."""
    def score(ref: np.ndarray, dist: np.ndarray, cfg: IQA | None = None) -> np.ndarray:
        for x in (ref, dist):
            if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
                raise ValueError(f"expected uint8 (N, H, W, 3) RGB stacks, got {x.dtype} {x.shape}")
        with torch.no_grad():
            return stacks.per_image(fn, ref, dist, BATCH, lambda a: torch.from_numpy(
                np.ascontiguousarray(a)).permute(0, 3, 1, 2).to(DTYPE) / 255.0)
    score.__name__ = fn.__name__
    score.__doc__ = fn.__doc__
    return score


@_batched
def gmsd(ref: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """GMSD (Xue et al. 2014): a distance, 0 for identical images; use exp_decay."""
    return _piq().gmsd(dist, ref, reduction="none", data_range=1.0)


@_batched
def fsim(ref: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """FSIMc (Zhang et al. 2011) at native 32x32: a similarity, 1 for identical images."""
    return _piq().fsim(dist, ref, reduction="none", data_range=1.0, chromatic=FSIM_CHROMATIC)


@_batched
def vif(ref: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """VIF-p (Sheikh & Bovik 2006) after nearest-neighbour upsampling of both images by the
    smallest integer factor that piq accepts (2 for 32x32): 1 for identical images."""
    k = vif_upsample_factor(*ref.shape[-2:])
    if k > 1:
        ref, dist = (F.interpolate(t, scale_factor=k, mode="nearest") for t in (ref, dist))
    return _piq().vif_p(dist, ref, reduction="none", data_range=1.0)  # not symmetric: piq takes (distorted, ref)
