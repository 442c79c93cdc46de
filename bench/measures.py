"""The numbers of docs/quality_measures.md, computed: every quality measure of iqals.iqa on the
test images at the study's nine levels.

    PYTHONPATH=. python -m bench.measures [--n 1000] [--no-float64] [--write]

Images: the first N test images of the local copy named by $CIFAR10_LOCAL, distorted by the
distort stage's code under params.yaml's `distort` (the same bytes as data/distorted/test.npy
when N is the whole test set). Each measure is scored with iqals.iqa.METRICS, mapped by the
transform docs/quality_measures.md recommends for it (TRANSFORM below) and clipped to iqa.clip.
Also computed: each measure's range and its Spearman correlation with SSIM; where GMSD's
exp_decay scale puts its targets (the 99th percentile, the share clipped at the floor, the scale
that matches SSIM's mean target); the share of VIF's targets under the floor; VIF after the two
rejected ways of enlarging 32x32 images; and, unless --no-float64, piq's float32 against float64.

Prints a Markdown block; --write puts it between the `measures` markers of the document.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.timed import cpu  # noqa: E402
from iqals import distort, iqa, iqa_piq  # noqa: E402
from iqals.data import LOCAL_COPY_ENV, load_npz  # noqa: E402
from iqals.io import write_text  # noqa: E402
from iqals.params import DISTORTIONS, IQA, IQA_METRICS, LEVELS, load, test_set_name  # noqa: E402
from iqals.readme import put_block  # noqa: E402

DOC = REPO_ROOT / "docs" / "quality_measures.md"
# measure -> (iqa.transform, iqa.transform_scale) the document recommends (its first table)
TRANSFORM = {"gmsd": ("exp_decay", 0.1), "fsim": ("identity", 1.0), "vif": ("identity", 1.0),
             "ssim": ("identity", 1.0), "psnr": ("linear", 50.0)}
GMSD_SCALES = (0.15, 0.1, 0.08, 0.05)


def targets(s: np.ndarray, metric: str, cfg: IQA) -> np.ndarray:
    """iqa.target_probability under the transform the document recommends for `metric`."""
    name, scale = TRANSFORM[metric]
    return iqa.target_probability(s, dataclasses.replace(cfg, transform=name, transform_scale=scale))


def vif_enlarged(ref: np.ndarray, dist: np.ndarray, how: str) -> np.ndarray:
    """VIF-p after bicubic x2 (clamped to [0, 1]) or reflect-padding by 5 px, the rejected options."""
    import piq

    def enlarge(a):
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255.0
        if how == "bicubic":
            return F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
        return F.pad(x, (5, 5, 5, 5), mode="reflect")

    out = [piq.vif_p(enlarge(dist[i:i + 500]), enlarge(ref[i:i + 500]), reduction="none", data_range=1.0)
           for i in range(0, len(ref), 500)]
    return torch.cat(out).double().numpy()


def compute(n: int, float64: bool, say=print) -> dict:
    p = load(REPO_ROOT / "params.yaml")
    local = os.environ.get(LOCAL_COPY_ENV)
    if not local:
        raise SystemExit(f"set {LOCAL_COPY_ENV} to the directory of the CIFAR-10 copy (test.npz)")
    images, _ = load_npz(Path(local) / "test.npz", "test")
    if not 1 <= n <= len(images):
        raise SystemExit(f"--n {n}: expected 1 to {len(images)} (the test images of {local})")
    images = np.ascontiguousarray(images[:n])
    dist = distort.distort_all(images, p.distort, p.base.seed, "test", np.arange(n))  # (types, levels, N, ...)
    grid = dist.reshape((-1,) + images.shape)

    def timed(metrics, what=""):  # (9, N) scores and seconds of each; warmed up: imports and set-up untimed
        scores, seconds = {}, {}
        for m in metrics:
            iqa.METRICS[m](images[:2], grid[0, :2], p.iqa)
        for m in metrics:
            t0 = time.perf_counter()
            scores[m] = np.stack([iqa.METRICS[m](images, d, p.iqa) for d in grid])
            seconds[m] = time.perf_counter() - t0
            say(f"{m}{what}: {seconds[m]:.1f} s")
        return scores, seconds

    scores, seconds = timed(IQA_METRICS)
    out = {"n": n, "clip": p.iqa.clip, "scores": scores, "seconds": seconds,
           "targets": {m: targets(scores[m], m, p.iqa) for m in IQA_METRICS}}
    out["vif_enlarged"] = {how: np.stack([vif_enlarged(images, d, how) for d in grid])
                           for how in ("bicubic", "reflect")}
    if float64:
        iqa_piq.DTYPE = torch.float64
        out["float64"], out["seconds64"] = timed(("gmsd", "fsim", "vif"), " in float64")
    return out


def gmsd_scale_matching(s: np.ndarray, mean: float, clip) -> float:
    """The exp_decay scale whose clipped targets have this mean (they grow with the scale)."""
    lo, hi = 1e-4, 10.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if np.clip(np.exp(-s / mid), *clip).mean() < mean else (lo, mid)
    return math.sqrt(lo * hi)


def markdown(r: dict) -> str:
    names = [test_set_name(t, lv) for t in range(len(DISTORTIONS)) for lv in range(LEVELS)]
    floor = r["clip"][0]
    head = f"{'':24s}" + "".join(f"{n:>9s}" for n in names)
    rows = [head]
    for m in ("gmsd", "fsim", "vif", "ssim", "psnr"):
        digits = 2 if m == "psnr" else 4
        rows.append(f"{m:24s}" + "".join(f"{v:9.{digits}f}" for v in r["scores"][m].mean(1)))
        name, scale = TRANSFORM[m]
        label = f"target ({name} {scale:g})" if name != "identity" else "target"
        rows.append(f"  {label:22s}" + "".join(f"{v:9.3f}" for v in r["targets"][m].mean(1)))
    for how, s in r["vif_enlarged"].items():
        rows.append(f"{'vif, ' + how:24s}" + "".join(f"{v:9.4f}" for v in s.mean(1)))
    lines = [f"Computed by `python -m bench.measures` on the first {r['n']:,} test images (params.yaml's `distort`"
             f" and `iqa.clip` = [{r['clip'][0]:g}, {r['clip'][1]:g}]): each measure's mean per level, then its mean"
             " target after the document's transform and the clip; last, VIF after the two rejected enlargements.",
             "", "```", *rows, "```", ""]
    s, t = r["scores"], r["targets"]
    lines.append("- Mean target over the nine levels: "
                 + ", ".join(f"{m} {t[m].mean():.3f}" for m in ("ssim", "fsim", "gmsd", "psnr", "vif")) + ".")
    lines.append("- Range over all pairs: " + ", ".join(
        f"{m} {s[m].min():.{1 if m == 'psnr' else 3}f} to {s[m].max():.{1 if m == 'psnr' else 3}f}"
        for m in ("gmsd", "fsim", "vif", "ssim", "psnr")) + ".")
    lines.append("- Spearman correlation with SSIM over all pairs: " + ", ".join(
        f"{m} {stats.spearmanr(s[m].ravel(), s['ssim'].ravel())[0]:.2f}"
        for m in ("vif", "fsim", "gmsd", "psnr")) + ".")
    p99 = np.percentile(s["gmsd"], 99)
    match = gmsd_scale_matching(s["gmsd"], t["ssim"].mean(), r["clip"])
    lines.append(f"- GMSD: 99th percentile {p99:.3f} (/ ln 10 = {p99 / math.log(10):.3f}); targets at the {floor:g} "
                 "floor with exp_decay scale " + ", ".join(
                     f"{sc:g}: {100 * (np.exp(-s['gmsd'] / sc) < floor).mean():.2f} %" for sc in GMSD_SCALES)
                 + f"; scale {match:.3f} gives SSIM's mean target {t['ssim'].mean():.3f}.")
    lines.append(f"- VIF: {100 * (s['vif'] < floor).mean():.2f} % of the targets under the {floor:g} floor.")
    if "float64" in r:
        parts = []
        for m, s64 in r["float64"].items():
            d = np.abs(s[m] - s64)
            parts.append(f"{m} {d.max():.1e}" + (f" (mean {d.mean():.0e}, 99th percentile {np.percentile(d, 99):.1e})"
                                                 if m == "vif" else ""))
        lines.append("- piq in float32 against float64, largest difference: " + ", ".join(parts) + "; float64 took "
                     + ", ".join(f"{r['seconds64'][m] / r['seconds'][m]:.1f}x the time ({m})" for m in r["float64"])
                     + f" ({r['n'] * 9:,} pairs, one process, {cpu()}).")
    wrap = lambda s: textwrap.fill(s, 99, subsequent_indent="  " if s.startswith("- ") else "",  # noqa: E731
                                   break_on_hyphens=False, break_long_words=False)
    code = lines.index("```"), len(lines) - lines[::-1].index("```")  # the table: as it is
    return "\n".join(line if code[0] <= i < code[1] else wrap(line) for i, line in enumerate(lines)) + "\n"


def write_block(text: str, path: Path = DOC) -> None:
    doc = path.read_text()
    begin, end = "<!-- measures:begin -->", "<!-- measures:end -->"
    if doc.count(begin) != 1 or doc.count(end) != 1:
        raise SystemExit(f"{path}: expected one {begin} and one {end} marker")
    write_text(path, put_block(doc, "measures", text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="test images (default 1000)")
    ap.add_argument("--no-float64", action="store_true", help="skip piq in float64 (the slow part)")
    ap.add_argument("--write", action="store_true", help=f"write the block into {DOC.relative_to(REPO_ROOT)}")
    args = ap.parse_args()
    r = compute(args.n, not args.no_float64, say=lambda m: print(m, file=sys.stderr))
    text = markdown(r)
    print(text)
    if args.write:
        write_block(text)


if __name__ == "__main__":
    main()
