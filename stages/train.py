"""Stage train: one strategy, one seed -> models/<strategy>/seed<k>.pt and logs/<strategy>/seed<k>.tsv.

dvc.yaml runs strategies with one-hot targets (train_onehot) without --scores, so they do not
depend on the score stage or iqa.*; all others (train_scored) get --scores. A checkpoint in
checkpoints/ (not a DVC output, so DVC never deletes it) lets an interrupted run resume.
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
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--strategy", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--distorted", default="data/distorted")
    ap.add_argument("--scores", default=None, help="data/scores: only for strategies that use them")
    ap.add_argument("--models", default="models")
    ap.add_argument("--logs", default="logs")
    ap.add_argument("--checkpoints", default="checkpoints")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs (tests)")
    args = ap.parse_args()
    p = setup("train")
    if args.strategy not in p.strategies:
        raise ValueError(f"--strategy {args.strategy}: not in params.yaml strategies {sorted(p.strategies)}")
    if args.seed not in p.train.seeds:
        raise ValueError(f"--seed {args.seed}: not in params.yaml train.seeds {list(p.train.seeds)}")
    s = p.strategies[args.strategy]
    if s.needs_scores != (args.scores is not None):
        raise ValueError(f"strategy {s.name} (labels {s.labels}) "
                         + ("needs --scores: train it in dvc.yaml's train_scored group" if s.needs_scores
                            else "must not read scores: train it in dvc.yaml's train_onehot group"))
    images, labels = load_npz(Path(args.raw) / "train.npz", "train")
    distorted = np.load(Path(args.distorted) / "train.npy", mmap_mode="r") if s.distortions else None
    scores = np.load(Path(args.scores) / "train.npy") if args.scores else None
    device = pick_device(p.train.device)
    log.info("%s seed %d: %s / %s, %d images, %d epochs on %s", s.name, args.seed, s.labels,
             s.train_set, len(labels), p.train.epochs, device)
    data = train_lib.prepare(s, images, labels, distorted, scores, p, args.seed, device)
    name = f"{s.name}/seed{args.seed}"
    train_lib.train(s, args.seed, data, p, device, model_out=Path(args.models) / f"{name}.pt",
                    log_out=Path(args.logs) / f"{name}.tsv",
                    checkpoint=Path(args.checkpoints) / f"{name}.pt", stop_after=args.stop_after)


if __name__ == "__main__":
    run(main)
