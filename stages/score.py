"""Stage score: quality score s(x) of every distorted image against its pristine source.

data/scores/{train,test}.npy: float64 (types, levels, N), aligned with data/distorted. metrics/score.json: per type
and level, the distribution of s and of the target T(s) (clipped to iqa.clip), and how many targets the clip changed.
"""
import logging
from pathlib import Path

import numpy as np

from iqals import iqa, stacks
from iqals.data import DataError, load_raw
from iqals.io import save_npy, write_json
from iqals.params import DISTORTIONS, LEVELS, NUM_COPIES
from stages.common import cli, run, setup


def main() -> None:
    args = cli(__doc__, raw="data/raw", distorted="data/distorted", out="data/scores", metrics="metrics/score.json")
    p = setup("score")
    report = {"metric": p.iqa.metric, "transform": p.iqa.transform}
    for split, (images, _) in load_raw(args.raw).items():
        d = np.load(Path(args.distorted) / f"{split}.npy", mmap_mode="r")
        want = (len(DISTORTIONS), LEVELS) + images.shape  # types, levels, then data/raw's images
        if d.shape != want:
            raise DataError(f"{args.distorted}/{split}.npy has shape {d.shape}, expected {want} for data/raw: "
                            "rerun the distort stage")
        logging.info("%s: scoring %d x %d images with %s", split, len(images), NUM_COPIES - 1, p.iqa.metric)
        s = iqa.score_all(images, d.reshape((-1,) + images.shape), p.iqa).reshape(len(DISTORTIONS), LEVELS, -1)
        save_npy(Path(args.out) / f"{split}.npy", s)
        report[split] = stacks.per_level(s, lambda x: iqa.summary(x, p.iqa))
    write_json(args.metrics, report)


if __name__ == "__main__":
    run(main)
