"""Batched SSIM (iqals.iqa) against skimage in a per-image loop, on the study's 9 distortions.

For N images (default 2000) and their 9 distorted versions (blur, noise, JPEG x 3 levels of
params.yaml): the time per image pair of
- skimage.metrics.structural_similarity in a loop (float64 luminance, Gaussian window, the
  paper's constants), on the first --loop-n images only (default 300) to keep it quick;
- iqa.score_all (what the score stage calls: the reference's maps filtered once for 9 versions);
- iqa.METRICS["ssim"] called once per version (the single-pair API);
- iqa.score_all again with one torch thread (a per-core comparison with the loop);
their speed-ups over the loop, and the largest absolute difference from skimage (loop subset).
Our timings are the best of --repeats runs; the load average is reported because other
processes on the machine slow everything down.

Images: the first N test (then training) images of the local copy named by $CIFAR10_LOCAL, else
N synthetic natural-looking images.

    PYTHONPATH=. python bench/bench_ssim.py [--n 2000] [--loop-n 300] [--out bench/out/bench_ssim.json]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from skimage.metrics import structural_similarity  # noqa: E402

from bench.bench_distort import synthetic_images  # noqa: E402
from iqals import distort, iqa  # noqa: E402
from iqals.data import LOCAL_COPY_ENV, load_npz  # noqa: E402
from iqals.params import load  # noqa: E402


def bench_images(n: int) -> tuple[np.ndarray, str]:
    local = os.environ.get(LOCAL_COPY_ENV)
    if local:
        parts = [load_npz(Path(local) / f"{split}.npz", split)[0] for split in ("test", "train")]
        images = np.concatenate(parts)[:n]
        if len(images) < n:
            raise SystemExit(f"{LOCAL_COPY_ENV}={local} holds only {len(images)} images, asked for {n}")
        return np.ascontiguousarray(images), f"local:{local}"
    return synthetic_images(n), "synthetic"


def skimage_loop(ref: np.ndarray, dists: np.ndarray, p) -> np.ndarray:
    """(V, n) SSIM, one skimage call per image pair, on float64 luminance."""
    def y(rgb):
        x = rgb.astype(np.float64)
        return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    out = np.empty(dists.shape[:2])
    for v in range(len(dists)):
        for i in range(len(ref)):
            out[v, i] = structural_similarity(y(ref[i]), y(dists[v, i]), gaussian_weights=True, sigma=p.sigma,
                                              win_size=p.win_size, K1=p.k1, K2=p.k2,
                                              use_sample_covariance=False, data_range=p.data_range)
    return out


def _best(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(n: int | None = None, loop_n: int = 300, repeats: int = 3) -> dict:
    n = int(n if n is not None else os.environ.get("BENCH_N", 2000))
    loop_n = min(loop_n, n)
    cfg = load(REPO_ROOT / "params.yaml")
    images, source = bench_images(n)
    dists = distort.distort_all(images, cfg.distort, cfg.base.seed, "bench").reshape((9,) + images.shape)
    load_before = os.getloadavg()[0]

    t_loop, ref_scores = _best(lambda: skimage_loop(images[:loop_n], dists[:, :loop_n], cfg.iqa.ssim), 1)
    iqa.score_all(images[:64], dists[:, :64], cfg.iqa)  # warm up (thread pool, MKL, caches)
    t_all, s_all = _best(lambda: iqa.score_all(images, dists, cfg.iqa), repeats)
    t_one, s_one = _best(lambda: np.stack([iqa.METRICS["ssim"](images, d, cfg.iqa) for d in dists]), repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same on one core, for a per-core comparison with the loop
    try:
        t_all1, _ = _best(lambda: iqa.score_all(images, dists, cfg.iqa), repeats)
    finally:
        torch.set_num_threads(threads)

    pairs = 9 * n
    us = {"skimage_loop": 1e6 * t_loop / (9 * loop_n), "score_all": 1e6 * t_all / pairs,
          "single_pair": 1e6 * t_one / pairs, "score_all_1_thread": 1e6 * t_all1 / pairs}
    result = {
        "n": n, "loop_n": loop_n, "versions": 9, "source": source, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "repeats": repeats,
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "us_per_image": {k: round(v, 3) for k, v in us.items()},
        "speedup": {k: round(us["skimage_loop"] / us[k], 1) for k in us if k != "skimage_loop"},
        "max_abs_diff_vs_skimage": {
            "score_all": float(np.abs(s_all[:, :loop_n] - ref_scores).max()),
            "single_pair": float(np.abs(s_one[:, :loop_n] - ref_scores).max())},
        "max_abs_diff_score_all_vs_single_pair": float(np.abs(s_all - s_one).max()),
    }

    print(f"SSIM, {n} images x 9 versions ({source}), {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, load average {result['load_average_before_after']}")
    print(f"{'path':20} {'us/image':>9} {'speed-up':>9} {'max |diff| vs skimage':>22}")
    print(f"{'skimage loop':20} {us['skimage_loop']:9.2f} {1.0:9.1f} {f'(reference, {loop_n} images)':>22}")
    for k in ("score_all", "single_pair"):
        print(f"{k:20} {us[k]:9.3f} {result['speedup'][k]:9.1f} {result['max_abs_diff_vs_skimage'][k]:22.2e}")
    k = "score_all_1_thread"
    print(f"{'score_all, 1 thread':20} {us[k]:9.3f} {result['speedup'][k]:9.1f}")
    return result


if __name__ == "__main__":
    from bench.cli import run
    run(main, __doc__)
