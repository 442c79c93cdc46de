"""Our distortions (iqals.distort) against a straightforward per-image loop.

For each type, all three levels of params.yaml over N images (default 5000): the time of our
code, the time of a plain per-image loop with the same libraries, their ratio, and the largest
absolute difference between the two outputs (blur and JPEG should agree; the loop's noise uses a
per-image seed, a different random stream, so only its time is comparable).

Images: the first N training images of the local copy named by $CIFAR10_LOCAL (repeated if it
holds fewer), else N synthetic natural-looking images.

    PYTHONPATH=. python bench/bench_distort.py [--n 5000] [--out bench/out/bench_distort.json]
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from iqals import distort  # noqa: E402
from iqals.data import LOCAL_COPY_ENV, load_npz  # noqa: E402
from iqals.params import load  # noqa: E402
from iqals.seeds import derive_seed  # noqa: E402

_CV_BORDER = {"replicate": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT_101,
              "constant": cv2.BORDER_CONSTANT}


def synthetic_images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth luminance-dominated fields plus an edge and fine texture, uint8 (n, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    img = rng.uniform(60, 190, size=(n, 1, 1, 1)).astype(np.float32) + np.zeros((n, 32, 32, 3), np.float32)
    for cells, amp in ((2, 45.0), (4, 25.0), (8, 12.0)):
        coarse = (rng.normal(0, amp, size=(n, cells, cells, 1))
                  + rng.normal(0, amp / 4, size=(n, cells, cells, 3))).astype(np.float32)
        for i in range(n):
            img[i] += cv2.resize(coarse[i], (32, 32), interpolation=cv2.INTER_CUBIC)
    theta = rng.uniform(0, np.pi, size=(n, 1, 1))
    off = rng.uniform(-8, 8, size=(n, 1, 1))
    half = (xx - 16) * np.cos(theta) + (yy - 16) * np.sin(theta) > off
    img += half[..., None] * rng.normal(0, 35, size=(n, 1, 1, 1)).astype(np.float32)
    img += rng.normal(0, 4, size=(n, 32, 32, 1)).astype(np.float32)
    return np.clip(np.floor(img + 0.5), 0, 255).astype(np.uint8)


def bench_images(n: int) -> tuple[np.ndarray, str]:
    local = os.environ.get(LOCAL_COPY_ENV)
    if local:
        images, _ = load_npz(Path(local) / "train.npz", "train")
        reps = math.ceil(n / len(images))
        return np.ascontiguousarray(np.concatenate([images] * reps)[:n]), f"local:{local}"
    return synthetic_images(n), "synthetic"


# ------------------------------------------------------------ the per-image baselines

def loop_blur(images, sigma, rule, border):
    k = 2 * distort.kernel_radius(sigma, rule) + 1
    out = np.empty_like(images)
    for i, im in enumerate(images):
        y = cv2.GaussianBlur(im.astype(np.float64), (k, k), sigma, sigmaY=sigma,
                             borderType=_CV_BORDER[border])
        out[i] = np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)
    return out


def loop_noise(images, var, seed):
    out = np.empty_like(images)
    sd = math.sqrt(var)
    for i, im in enumerate(images):
        rng = np.random.default_rng([seed, i])
        y = im / 255.0 + rng.standard_normal(im.shape) * sd
        out[i] = np.floor(np.clip(y, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out


def loop_jpeg(images, quality, subsampling):
    flags = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
             getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{subsampling}")]
    out = np.empty_like(images)
    for i, im in enumerate(images):
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR), flags)
        assert ok
        out[i] = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(n: int | None = None) -> dict:
    n = int(n if n is not None else os.environ.get("BENCH_N", 5000))
    cfg = load(REPO_ROOT / "params.yaml")
    d, seed = cfg.distort, cfg.base.seed
    images, source = bench_images(n)
    ours = {
        "blur": lambda lv: distort.blur(images, d.blur_sigma[lv], d.blur_kernel, d.blur_border),
        "noise": lambda lv: distort.noise(images, d.noise_var[lv], derive_seed(seed, "noise", "bench", lv)),
        "jpeg": lambda lv: distort.jpeg(images, d.jpeg_quality[lv], d.jpeg_subsampling),
    }
    looped = {
        "blur": lambda lv: loop_blur(images, d.blur_sigma[lv], d.blur_kernel, d.blur_border),
        "noise": lambda lv: loop_noise(images, d.noise_var[lv], derive_seed(seed, "noise", "bench", lv)),
        "jpeg": lambda lv: loop_jpeg(images, d.jpeg_quality[lv], d.jpeg_subsampling),
    }
    result = {"n": n, "source": source, "cpu_count": os.cpu_count(), "opencv": cv2.__version__,
              "levels": 3, "types": {}}
    for kind in ("blur", "noise", "jpeg"):
        tb = tl = 0.0
        max_diff, n_diff = 0, 0
        for lv in range(3):
            t, a = _timed(lambda: ours[kind](lv))
            tb += t
            t, b = _timed(lambda: looped[kind](lv))
            tl += t
            diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
            max_diff, n_diff = max(max_diff, int(diff.max())), n_diff + int(np.count_nonzero(diff))
        row = {"ours_s": round(tb, 4), "loop_s": round(tl, 4),
               "speedup": round(tl / tb, 2) if tb > 0 else None,
               "images_per_s": round(3 * n / tb) if tb > 0 else None}
        if kind == "noise":
            row["outputs_comparable"] = False  # different random streams
        else:
            row.update(outputs_comparable=True, max_abs_diff=max_diff, n_values_differing=n_diff)
        result["types"][kind] = row

    print(f"distortions, 3 levels each, {n} images ({source}), {os.cpu_count()} CPUs, OpenCV {cv2.__version__}")
    print(f"{'type':6} {'ours s':>10} {'loop s':>9} {'speedup':>8} {'max |diff|':>11}")
    for kind, r in result["types"].items():
        md = r.get("max_abs_diff", "n/a")
        print(f"{kind:6} {r['ours_s']:10.3f} {r['loop_s']:9.3f} {r['speedup']:8.2f} {md!s:>11}")
    return result


if __name__ == "__main__":
    from bench.cli import run
    run(main, __doc__)
