"""Stage score: quality score s(x) of every distorted image against its pristine source.

data/scores/{train,test}.npy: float64 (3 types, 3 levels, N), aligned with data/distorted.
metrics/score.json: per type and level, the distribution of s and of the target T(s) (clipped
to iqa.clip), and how many targets the clip changed (PROTOCOL.md asks to report it).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from iqals import iqa
from iqals.data import load_raw
from iqals.io import save_npy, write_json
from iqals.params import DISTORTIONS
from stages.common import run, setup

log = logging.getLogger("score")


def summary(scores: np.ndarray, cfg) -> dict:
    out = {}
    for t, kind in enumerate(DISTORTIONS):
        for lv in range(3):
            s = scores[t, lv]
            raw_t = iqa.TRANSFORMS[cfg.transform](s, cfg.transform_scale)
            q = iqa.target_probability(s, cfg)
            out[f"{kind}_{lv + 1}"] = {
                "mean": round(float(s.mean()), 5), "std": round(float(s.std()), 5),
                "p05": round(float(np.percentile(s, 5)), 5), "median": round(float(np.median(s)), 5),
                "p95": round(float(np.percentile(s, 95)), 5),
                "target_mean": round(float(q.mean()), 5),
                "clipped": int(np.sum(q != raw_t)),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--distorted", default="data/distorted")
    ap.add_argument("--out", default="data/scores")
    ap.add_argument("--metrics", default="metrics/score.json")
    args = ap.parse_args()
    p = setup("score")
    raw = load_raw(args.raw)
    report = {"metric": p.iqa.metric, "transform": p.iqa.transform}
    for split, (images, _) in raw.items():
        d = np.load(Path(args.distorted) / f"{split}.npy", mmap_mode="r")
        if d.shape[2:] != images.shape:
            raise ValueError(f"{args.distorted}/{split}.npy holds {d.shape[2]} images, data/raw "
                             f"{len(images)}: rerun the distort stage")
        log.info("%s: scoring %d x 9 images with %s", split, len(images), p.iqa.metric)
        s = iqa.score_all(images, d.reshape((9,) + images.shape), p.iqa).reshape(3, 3, -1)
        save_npy(Path(args.out) / f"{split}.npy", s)
        report[split] = summary(s, p.iqa)
    write_json(args.metrics, report)


if __name__ == "__main__":
    run(main)
