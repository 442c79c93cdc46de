"""Stage corrupt: data/raw/test.npz -> data/corrupted/test.npy and metrics/corrupt.json.

CIFAR-10-C style corruptions of the test set (iqals/corruptions.py), for evaluation only: none
of these families is used in training. The .npy is uint8 (F, S, N, 32, 32, 3): families and
severities in the order of params.yaml corrupt.families and corrupt.severities; load it with
np.load(path, mmap_mode="r"). The metrics give, per family and severity, the mean PSNR against
the pristine image, so a reviewer sees what each severity does.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from iqals import corruptions
from iqals.data import load_npz, official_index
from iqals.io import save_npy, write_json
from stages.common import run, setup

log = logging.getLogger("corrupt")


def summary(pristine: np.ndarray, corrupted: np.ndarray, cfg) -> dict:
    """{family: {severity: mean PSNR (dB)}} plus each family's mean over its severities."""
    out = {}
    for f, family in enumerate(cfg.families):
        per = {str(s): round(float(corruptions.psnr(pristine, corrupted[f, i]).mean()), 4)
               for i, s in enumerate(cfg.severities)}
        out[family] = {"psnr_db": per, "mean_psnr_db": round(float(np.mean(list(per.values()))), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--out", default="data/corrupted/test.npy")
    ap.add_argument("--metrics", default="metrics/corrupt.json")
    args = ap.parse_args()
    cfg = setup("corrupt").corrupt

    path = Path(args.raw) / "test.npz"
    images, _ = load_npz(path, "test")
    index = official_index(path)
    log.info("%d test images x %d families x %d severities", len(images), len(cfg.families),
             len(cfg.severities))
    with tqdm(total=len(cfg.families) * len(cfg.severities), desc="corrupt", unit="set") as bar:
        out = corruptions.corrupt_all(images, cfg.families, cfg.severities, cfg.seed, index, progress=bar)
    save_npy(args.out, out)
    write_json(args.metrics, {"test_images": len(images), "seed": cfg.seed,
                              "families": list(cfg.families), "severities": list(cfg.severities),
                              "levels": summary(images, out, cfg)})


if __name__ == "__main__":
    run(main)
