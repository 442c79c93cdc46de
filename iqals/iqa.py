"""Full-reference quality scores s(x) of distorted images and the map T into (0, 1].

`METRICS[name](ref, dist, cfg)` takes uint8 (N, H, W, 3) RGB stacks and returns float64 (N,).
`score_all(ref, dists, cfg)` scores V distorted versions (V, N, H, W, 3) of the same references
with cfg.metric and returns (V, N); SSIM then filters each reference's maps once for all versions.
Adding a measure means adding it here; the training code only sees scores.
"""
from __future__ import annotations

import math
import queue
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable

import cv2
import numpy as np
import torch

from . import iqa_piq, stacks
from .params import IQA, SSIM

SSIM_CHUNK_MAPS = 928  # maps per SSIM chunk (2 + 3V per reference, see ssim_y): ~30 torch calls
                       # per chunk want it large, the cache small (32 x 29 measured best)
_LUM1000 = np.array([[299.0, 587.0, 114.0]], dtype=np.float32)  # 1000 x Rec. 601 weights
_WORKSPACES: queue.SimpleQueue = queue.SimpleQueue()  # SSIM buffers, ~7 MB per thread, kept
                                                      # across calls (see _scratch)


def _scratch(work: dict, name: str, *shape: int) -> torch.Tensor:
    """float32 tensor `shape` carved from the buffer `name` of `work`, kept for the next chunk.

    Fresh multi-MB tensors cost a page fault per 4 KiB on first write: 10-20% of the time when
    allocated per call, more per chunk.
    """
    numel = math.prod(shape)
    if name not in work or work[name].numel() < numel:
        work[name] = torch.empty(numel)
    return work[name][:numel].view(shape)


def luminance1000(rgb: np.ndarray, work: dict | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """1000 Y of uint8 RGB stacks (..., N, H, W, 3) as float32 (..., N, H, W), into `out` if
    given: integers below 2^24, so exact.

    cv2.transform weighs the interleaved channels with SIMD code, ~3x faster than torch or
    numpy on the strided channels. It needs float input, made one (N, H, W, 3) stack at a time
    so that the copy stays in cache.
    """
    work = {} if work is None else work
    rgb = np.asarray(rgb)
    y = torch.empty(rgb.shape[:-1]) if out is None else out
    stacks, ys = rgb.reshape((-1,) + rgb.shape[-4:]), y.numpy().reshape((-1,) + y.shape[-3:])
    f = _scratch(work, "rgb", *stacks.shape[1:]).numpy()
    for stack, ystack in zip(stacks, ys):
        np.copyto(f, stack)
        cv2.transform(f.reshape(-1, f.shape[-2], 3), _LUM1000, dst=ystack.reshape(-1, f.shape[-2]))
    return y


@lru_cache(maxsize=8)
def _band_blocks(size: int, win: int, sigma: float, blocks: int = 3) -> tuple:
    """The (size-win+1, size) "valid" Gaussian filter matrix G as diagonal blocks.

    G is banded (win taps per row), so a block of m output rows needs only m+win-1 input
    columns: 3 blocks of ~7 rows do 55% of the dense product's flops and save ~20% of its time;
    smaller blocks lose it again to GEMM overhead. Returns ((first row, block), ...).
    """
    r = win // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    n = size - win + 1
    if n < 1:
        raise ValueError(f"SSIM window {win} is larger than the {size}-pixel image side")
    edges = np.linspace(0, n, min(blocks, n) + 1).round().astype(int)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        g = np.zeros((hi - lo, hi - lo + win - 1))
        for i in range(hi - lo):
            g[i, i:i + win] = k
        out.append((int(lo), torch.from_numpy(g).float()))
    return tuple(out)


def _filter_rows(blocks, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[j, r] = sum_k G[j, k] x[r, k] for x (R, size): filters every row of x and writes
    the result transposed, so that the next filter pass again runs along rows (no copies)."""
    for lo, g in blocks:
        torch.mm(g, x[:, lo:lo + g.shape[1]].T, out=out[lo:lo + g.shape[0]])
    return out


def ssim_y(x: torch.Tensor, y: torch.Tensor, win: int, sigma: float, k1: float, k2: float,
           data_range: float, work: dict | None = None) -> torch.Tensor:
    """Mean SSIM over the valid region (Wang et al. 2004; skimage's gaussian_weights=True,
    use_sample_covariance=False) of V versions y (V, N, H, W) against x (N, H, W).

    float32 luminance in the units of data_range; returns float64 (V, N). Agrees with skimage
    in float64 to ~2e-6 on CIFAR-10 distortions thanks to the rewrites below. `work` holds
    buffers to reuse across calls (see _scratch); y may be the slots 2..V+1 of work["z"].
    """
    work = {} if work is None else work
    v, n, h, w = y.shape
    gh, gw = _band_blocks(h, win, sigma), _band_blocks(w, win, sigma)
    h2, w2, sl = h - win + 1, w - win + 1, 2 + 3 * v
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2

    # 1. Moments of x' = x - s (s ~ the image mean): (co)variances are unchanged and float32
    #    loses far less to cancellation in E[x'^2] - E[x']^2. Rounded shifts keep integer
    #    inputs such as luminance1000 exact.
    # 2. The versions enter only through d = y - x - t (t ~ the mean of y - x): E[d], E[d^2],
    #    E[x'd] are small for mild distortions, and the formula below puts them where float32
    #    errors hardly matter.
    # Maps, stacked as slots: 0 x', 1 x'^2, then V each of d, d^2, x' d.  (2 + 3V, N, H, W)
    s = x.mean(dim=(1, 2), keepdim=True).round_()
    t = y.mean(dim=(2, 3), keepdim=True).sub_(s).round_()
    z = _scratch(work, "z", sl, n, h, w)
    xs = torch.sub(x, s, out=z[0])
    torch.mul(xs, xs, out=z[1])
    d = torch.sub(y, x, out=z[2:2 + v]).sub_(t)
    torch.mul(d, d, out=z[2 + v:2 + 2 * v])
    torch.mul(d, xs, out=z[2 + 2 * v:])

    # Separable Gaussian, "valid" part: filter along W, then H, as GEMMs over all maps at once.
    zw = _filter_rows(gw, z.view(-1, w), _scratch(work, "zw", w2, sl * n * h))        # (W', S, N, H)
    o = z.view(-1)[:h2 * w2 * sl * n].view(h2, -1)  # z is free now: reuse its memory
    o = _filter_rows(gh, zw.view(-1, h), o).view(h2, w2, sl, n)                       # (H', W', S, N)
    mx_, exx = o[:, :, 0], o[:, :, 1]
    md_, edd, exd = o[:, :, 2:2 + v], o[:, :, 2 + v:2 + 2 * v], o[:, :, 2 + 2 * v:]

    # SSIM = A B / (C D) with md = E[y - x] = E[d] + t, my = mx + md and
    #   A = 2 mx my + c1,  C = mx^2 + my^2 + c1 = A + md^2,
    #   B = 2 sxy + c2 = 2 (sxx + sxd) + c2,  D = sxx + syy + c2 = B + sdd,
    # so the reference-sized terms (and their float32 errors) sit in A and B, and C, D add the
    # small difference terms md^2 and sdd = E[d^2] - E[d]^2 to them.
    # In place where possible, for a smaller working set: B overwrites the slots of E[x'd], D
    # those of E[d^2], md and then C those of E[d] (the order matters), A the free zw.
    mx = mx_ + s.view(1, 1, n)
    a0 = (mx * mx).mul_(2).add_(c1).unsqueeze(2)                                     # 2 mx^2 + c1
    b0 = torch.addcmul(exx, mx_, mx_, value=-1).mul_(2).add_(c2).unsqueeze(2)        # 2 sxx + c2
    b = torch.add(b0, exd, alpha=2, out=exd).addcmul_(mx_.unsqueeze(2), md_, value=-2)   # B
    dd = edd.addcmul_(md_, md_, value=-1).add_(b)                                    # D
    md = md_.add_(t.view(1, 1, v, n))                                                # E[d]
    a = torch.addcmul(a0, mx.mul_(2).unsqueeze(2), md, out=zw.view(-1)[:md.numel()].view(md.shape))
    c = torch.addcmul(a, md, md, out=md)                                             # C
    smap = a.mul_(b).div_(c.mul_(dd))                                                # (H', W', V, N)
    # Mean over the map: float32 sums of 22 values, then float64 for the rest.
    return smap.view(h2, -1).sum(0).view(w2, v, n).double().sum(0) / (h2 * w2)


def ssim_many(ref: np.ndarray, dists: np.ndarray, p: SSIM) -> np.ndarray:
    """Mean SSIM of V versions (V, N, H, W, 3) uint8 against their references (N, H, W, 3) uint8,
    on luminance Y: float64 (V, N)."""
    ref, dists = np.asarray(ref), np.asarray(dists)
    if dists.ndim != 5 or dists.shape[1:] != ref.shape or ref.shape[-1] != 3:
        raise ValueError(f"versions {dists.shape} do not match references {ref.shape} "
                         "(expected (V, N, H, W, 3) and (N, H, W, 3))")
    out = np.empty(dists.shape[:2], dtype=np.float64)
    # Parallel over chunks, each torch op single-threaded: torch's own threads fork and join in
    # every op, and on a busy machine each join waits for a descheduled thread (10-20x slower
    # on 2 loaded cores); independent chunks just share the cores. torch, cv2 and numpy release
    # the GIL while they compute.
    n = max(1, SSIM_CHUNK_MAPS // (2 + 3 * len(dists)))  # references per chunk
    workers = max(1, min(torch.get_num_threads(), math.ceil(len(ref) / n)))

    def worker(k: int) -> None:
        try:  # buffers for this thread's chunks, kept from an earlier call (see _scratch)
            work = _WORKSPACES.get_nowait()
        except queue.Empty:
            work = {}
        try:
            for i in range(k * n, len(ref), workers * n):
                m = min(n, len(ref) - i)
                x = luminance1000(ref[i:i + m], work, _scratch(work, "x", m, *ref.shape[1:3]))
                # the versions' luminance straight into the slots ssim_y turns into d, in place:
                # one buffer less, which keeps more of the working set in cache
                z = _scratch(work, "z", 2 + 3 * len(dists), m, *ref.shape[1:3])
                y = luminance1000(dists[:, i:i + m], work, z[2:2 + len(dists)])
                out[:, i:i + m] = ssim_y(x, y, p.win_size, p.sigma, p.k1, p.k2, 1000.0 * p.data_range,
                                         work).numpy()
        finally:
            _WORKSPACES.put(work)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(worker, range(workers)))
    finally:
        torch.set_num_threads(threads)
    return out


def ssim(ref: np.ndarray, dist: np.ndarray, cfg: IQA) -> np.ndarray:
    """Mean SSIM of each distorted image against its reference, on luminance: float64 (N,)."""
    stacks.check_pair(ref, dist)
    return ssim_many(ref, np.asarray(dist)[None], cfg.ssim)[0]


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, IQA], np.ndarray]] = {
    "ssim": ssim, "psnr": stacks.psnr, **iqa_piq.METRICS}  # gmsd, fsim and vif from piq (iqals/iqa_piq.py)


def score_all(ref: np.ndarray, dists: np.ndarray, cfg: IQA) -> np.ndarray:
    """cfg.metric of every version (V, N, H, W, 3) against its reference (N, H, W, 3): (V, N)."""
    if cfg.metric == "ssim":  # the reference's filtered maps serve all V versions
        return ssim_many(ref, dists, cfg.ssim)
    if cfg.metric not in METRICS:
        raise ValueError(f"iqa.metric {cfg.metric!r}: not in iqals.iqa.METRICS {sorted(METRICS)}")
    return np.stack([METRICS[cfg.metric](ref, d, cfg) for d in dists])


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


def summary(s: np.ndarray, cfg: IQA) -> dict:
    """The distribution of the scores s of one level, of their targets T(s), and how many
    targets the clip to iqa.clip changed (PROTOCOL.md asks to report it)."""
    q = target_probability(s, cfg)
    clipped = int(np.sum(q != TRANSFORMS[cfg.transform](s, cfg.transform_scale)))
    stats = {"mean": s.mean(), "std": s.std(), "p05": np.percentile(s, 5), "median": np.median(s),
             "p95": np.percentile(s, 95), "target_mean": q.mean()}
    return {**{k: round(float(v), 5) for k, v in stats.items()}, "clipped": clipped}
