"""Stage train: (strategy, seed) runs -> models/<strategy>/seed<k>.pt and logs/<strategy>/seed<k>.tsv.

    python -m stages.train --strategy S3 --seed 0 --scores data/scores     (one run; dvc.yaml)
    python -m stages.train --run S3:0 --run S3:1 --run S1:0 --scores data/scores    (together)

Runs given with --run train together in one process as one stacked model (iqals.train.train_group),
each with its own initial weights, draws and targets, writing exactly what the one-run form writes.
dvc.yaml runs strategies with one-hot targets (train_onehot) without --scores, so they do not
depend on the score stage or iqa.*; all others (train_scored) get --scores: it is required iff
some run needs scores. A checkpoint in checkpoints/ (not a DVC output, so DVC never deletes it)
lets an interrupted run resume.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from iqals import train as train_lib
from iqals.data import load_npz
from iqals.model import pick_device
from stages.common import run, setup

log = logging.getLogger("train")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--run", action="append", metavar="S:k", help="a run to train together with the others")
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--distorted", default="data/distorted")
    ap.add_argument("--scores", default=None, help="data/scores: iff some run's strategy uses them")
    ap.add_argument("--models", default="models")
    ap.add_argument("--logs", default="logs")
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (tests)")
    args = ap.parse_args()
    p = setup("train")
    runs = train_lib.parse_runs(args.strategy, args.seed, args.run, args.scores, p)
    images, labels = load_npz(Path(args.raw) / "train.npz", "train")
    distorted = (np.load(Path(args.distorted) / "train.npy", mmap_mode="r")
                 if any(s.distortions for s, _ in runs) else None)
    scores = np.load(Path(args.scores) / "train.npy") if args.scores else None
    device = pick_device(p.train.device)
    for s, seed in runs:
        log.info("%s seed %d: %s / %s, %d images, %d epochs on %s (%s, %s step)", s.name, seed, s.labels,
                 s.train_set, len(labels), p.train.epochs, device, p.train.precision, p.train.step)
    data = train_lib.prepare_group(runs, images, labels, distorted, scores, p, device)
    names = [f"{s.name}/seed{seed}" for s, seed in runs]
    train_lib.train_group([train_lib.Run(s, seed, d, Path(args.models) / f"{name}.pt", Path(args.logs) / f"{name}.tsv",
                                         Path(args.checkpoints) / f"{name}.pt")
                           for (s, seed), d, name in zip(runs, data, names)], p, device, stop_after=args.stop_after)


if __name__ == "__main__":
    run(main)
