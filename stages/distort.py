"""Stage distort: data/raw -> data/distorted/{train,test}.npy and metrics/distort.json.

Each .npy is uint8 (3 types, 3 levels, N, 32, 32, 3), types in the order blur, noise, jpeg;
load with np.load(path, mmap_mode="r"). The metrics give, per type and level on the test set,
the mean PSNR and mean SSIM, so a reviewer sees what each level does.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from iqals import distort, iqa
from iqals.data import load_raw, official_index
from iqals.io import save_npy, write_json
from iqals.params import DISTORTIONS
from stages.common import run, setup

log = logging.getLogger("distort")


def summary(pristine: np.ndarray, distorted: np.ndarray, p) -> dict:
    out = {}
    for t, kind in enumerate(DISTORTIONS):
        for lv in range(3):
            d = distorted[t, lv]
            out[f"{kind}_{lv + 1}"] = {
                "psnr_db": round(float(iqa.psnr(pristine, d, p.iqa).mean()), 4),
                "ssim": round(float(iqa.ssim(pristine, d, p.iqa).mean()), 5),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--out", default="data/distorted")
    ap.add_argument("--metrics", default="metrics/distort.json")
    args = ap.parse_args()
    p = setup("distort")
    raw = load_raw(args.raw)
    log.info("OpenCV %s (JPEG encoder: its bundled libjpeg-turbo)", cv2.__version__)
    with tqdm(total=2 * 3 * len(DISTORTIONS), desc="distort", unit="set") as bar:
        for split, (images, _) in raw.items():
            index = official_index(Path(args.raw) / f"{split}.npz")
            d = distort.distort_all(images, p.distort, p.base.seed, split, index, progress=bar)
            save_npy(Path(args.out) / f"{split}.npy", d)
            if split == "test":
                test = (images, d)
    write_json(args.metrics, {"opencv": cv2.__version__, "test_images": len(test[0]),
                              "levels": summary(*test, p)})


if __name__ == "__main__":
    run(main)
