"""GMSD, FSIM and VIF (pixel domain) from piq, batched, with the signature of `iqa.METRICS`.

Each function takes uint8 (N, H, W, 3) RGB stacks `ref` (pristine) and `dist` and returns float64
(N,); `cfg` (iqals.params.IQA) is accepted for the METRICS signature and not read. Images go to
piq as float [0, 1] (x / 255), BATCH at a time, reduction='none'. piq (photosynthesis-team)
checks FSIM and VIF-p against the authors' MATLAB code in its own test suite (FSIM 0.89691 on
goldhill, FSIMc 0.92587 on TID2013 I01, VIF-p 0.2665 on goldhill); tests/test_iqa_piq.py adds
NumPy re-implementations of GMSD.m and vifp_mscale.m. piq.vif_p in float64 also matches sewar
0.4.6's vifp to 4e-10 on CIFAR-10 test images (both on nearest-upsampled luminance).

Measures, their range at 32x32, and the recommended iqa.transform (then clipped to iqa.clip)
------------------------------------------------------------------------------------------------
gmsd  Gradient Magnitude Similarity Deviation (Xue et al. 2014), piq.gmsd, native 32x32.
      Luminance Y (YIQ) -> 2x2 mean, stride 2 (16x16) -> Prewitt gradient magnitudes -> GMS map
      with c = 170/255^2 -> its standard deviation. A DISTANCE: 0 for identical images, at most
      0.5 (std of a map in (0, 1]); 0.004-0.31 over the nine levels below. piq divides the std by
      n, GMSD.m's std2 by n - 1: GMSD.m = this value x sqrt(256/255) (+0.2 %) at 32x32.
      -> transform exp_decay, transform_scale 0.1: T = exp(-GMSD / 0.1). The scale is the round
      number nearest p99 / ln 10 = 0.091, where p99 = 0.209 is the 99th percentile of GMSD pooled
      over the nine levels: 99.7 % of the distorted images then get a target above the 0.1 floor
      (0.34 % are clipped; 0 % with scale 0.15, 2.7 % with 0.08, 12 % with 0.05).
fsim  FSIMc (Zhang et al. 2011), piq.fsim(chromatic=True), native 32x32: piq, like FeatureSIM.m,
      average-pools by max(1, round(min(H, W) / 256)) = 1 at 32x32, so no resampling; the
      coarsest log-Gabor wavelength (48 px) exceeds the image, as it would in FeatureSIM.m. A
      SIMILARITY in (0, 1], 1 for identical images (every factor is a similarity map <= 1);
      0.42-0.99 over the nine levels. FSIMc rather than FSIM (luminance only) so that the chroma
      damage of JPEG 4:2:0 counts; FSIM_CHROMATIC switches it.
      -> transform identity.
vif   VIF in the pixel domain (Sheikh & Bovik 2006), piq.vif_p. piq refuses images under 41x41
      ("Invalid size of the input images, expected at least 41x41."): its four-scale pyramid
      (17/9/5/3-tap Gaussian windows, 'valid' filtering, stride 2) runs out of pixels at 32x32.
      Fix: both images are upsampled by the smallest integer factor k with k * 32 >= 41 (k = 2,
      64x64) with NEAREST-NEIGHBOUR replication. It is the same linear operator on both images,
      adds no intensity values, weights every original pixel equally, and keeps the per-pixel
      distortion channel dist = g * ref + v that VIF models; the effect is that piq's windows
      cover half as many original pixels (scale-0 Gaussian sigma 3.4 px on 64x64 = 1.7 px of the
      original, close to SSIM's 1.5). Rejected alternatives, measured on the same data (means
      per level below): bicubic x2 (0.521/0.377/0.310 blur, 0.417/0.325/0.243 noise,
      0.327/0.267/0.174 JPEG) invents values and correlates the noise, so it rates noise
      milder in particular; reflect-padding by 5 px to 42x42 (0.522/0.403/0.347,
      0.408/0.323/0.246, 0.360/0.306/0.212) scores mirrored border content twice and lifts blur
      and JPEG against noise. Order matters: VIF is not
      symmetric, the reference is piq's second argument. A SIMILARITY: 1 for identical images,
      usually in [0, 1], above 1 for contrast enhancement. 0.03-0.71 over the nine levels: at
      32x32 it is much harsher than SSIM.
      -> transform identity (0.67 % of the nine levels' targets fall under the 0.1 floor).
psnr  (iqals/iqa.py) dB, 15.9-39.6 over the nine levels -> linear, transform_scale 50 (or 40).

Measured on the 1000 CIFAR-10 test images (/work/shared/data/cifar10/test.npz), distorted with
iqals.distort at the study's levels (blur sigma 0.7/1.0/1.2, truncate 2, replicate; noise var
0.005/0.01/0.02; JPEG q 12/8/4, 4:2:0). Per-level means of the measure, and below each the mean
target after the recommended transform and the clip to [0.1, 1]:

                 blur .7  blur 1  blur1.2  noi.005  noi.01  noi.02  jpeg12  jpeg8   jpeg4
  gmsd            0.0194  0.0421  0.0610   0.0366   0.0581  0.0855  0.0474  0.0765  0.1576
    exp_decay 0.1  0.826   0.663   0.552    0.701    0.572   0.441   0.628   0.474   0.222
  fsim (=target)  0.9537  0.9042  0.8679   0.8984   0.8501  0.7937  0.8979  0.8696  0.7978
  vif  (=target)  0.5005  0.3628  0.3005   0.3808   0.2938  0.2171  0.3104  0.2556  0.1675
  ssim (=target)  0.9312  0.8456  0.7808   0.8558   0.7747  0.6701  0.8379  0.7844  0.6540
  psnr dB         29.23   25.89   24.40    23.22    20.32   17.49   23.93   22.58   20.03
    linear 50      0.585   0.518   0.488    0.464    0.406   0.350   0.479   0.452   0.401

Mean target over the nine levels: ssim 0.793, fsim 0.870, gmsd (0.1) 0.564, psnr (50) 0.460,
vif 0.310. To give GMSD the same mean amount of smoothing as SSIM instead, use
transform_scale 0.265. Spearman correlation with SSIM over all 9000 pairs: vif 0.92, fsim 0.86,
gmsd -0.81, psnr 0.66.

Precision
---------
float32 (DTYPE). Against float64 on the 9000 pairs above, the largest differences are 2.4e-7
(gmsd), 1.1e-5 (fsim) and 5.7e-3 (vif; mean 8e-6, 99th percentile 1.3e-4: VIF's local
variances E[x^2] - E[x]^2 on the 0-255 scale cancel in flat regions). float64 costs 2-10x the
time for FSIM and 11x for VIF on CPU (no oneDNN), so it is not used.

Throughput, 9000 pairs on 2 CPU cores shared with other jobs (so the spread): gmsd 4-11 s,
vif 17-18 s, fsim 17-39 s. BATCH 256-2000 made no clear difference; per call, oneDNN sets up
each convolution (~35 ms), so tiny batches are slow.

No-reference measures
---------------------
None of piq's runs offline: piq.brisque downloads its SVR weights on first use
(https://github.com/photosynthesis-team/piq/releases/download/v0.4.0/brisque_svm_weights.pt,
torch.utils.model_zoo.load_url) and without a network fails with
"URLError: <urlopen error [Errno -2] Name or service not known>"; piq.CLIPIQA downloads its
tokens and CLIP weights the same way. piq.total_variation runs but is a smoothness statistic,
not a quality measure. So no NR measure is offered.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .params import IQA

BATCH = 512             # images per piq call (VIF at 64x64 holds ~25 float32 maps per image)
DTYPE = torch.float32   # see "Precision" above
FSIM_CHROMATIC = True   # FSIMc: phase congruency and gradients on Y, plus the I/Q chroma terms
def _piq():
    """piq, imported on first use: ssim and psnr never need it, and the GPU machine lacks it."""
    try:
        import piq
    except ImportError as e:
        raise ImportError(f"iqa.metric gmsd, fsim and vif need the package piq ({e}); ssim and psnr "
                          "do not") from None
    return piq


VIF_MIN_SIZE = 41       # piq.vif_p refuses smaller images: its 4-scale pyramid needs 41 pixels


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> DTYPE (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(DTYPE) / 255.0


def vif_upsample_factor(height: int, width: int) -> int:
    """Smallest integer factor k with k * min(height, width) >= VIF_MIN_SIZE (2 for 32x32)."""
    return max(1, math.ceil(VIF_MIN_SIZE / min(height, width)))


def _batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """fn(ref, dist) on float [0, 1] (B, 3, H, W) tensors, applied to uint8 stacks in batches."""
    def score(ref: np.ndarray, dist: np.ndarray, cfg: IQA | None = None) -> np.ndarray:
        if ref.shape != dist.shape:
            raise ValueError(f"reference {ref.shape} and distorted {dist.shape} stacks differ "
                             "in shape")
        if ref.ndim != 4 or ref.shape[-1] != 3 or ref.dtype != np.uint8 or dist.dtype != np.uint8:
            raise ValueError(f"expected uint8 (N, H, W, 3) RGB stacks, got {ref.dtype} {ref.shape} "
                             f"and {dist.dtype} {dist.shape}")
        out = np.empty(len(ref), dtype=np.float64)
        with torch.no_grad():
            for i in range(0, len(ref), BATCH):
                r, d = to_tensor(ref[i:i + BATCH]), to_tensor(dist[i:i + BATCH])
                out[i:i + BATCH] = fn(r, d).to(torch.float64).numpy()
        return out
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
        ref = F.interpolate(ref, scale_factor=k, mode="nearest")
        dist = F.interpolate(dist, scale_factor=k, mode="nearest")
    # Not symmetric: piq's first argument is the distorted image, the second the reference.
    return _piq().vif_p(dist, ref, reduction="none", data_range=1.0)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, IQA], np.ndarray]] = {
    "gmsd": gmsd,
    "fsim": fsim,
    "vif": vif,
}
