"""Stage train: (strategy, seed) runs -> models/<strategy>/seed<k>.pt and logs/<strategy>/seed<k>.tsv.

    python -m stages.train --strategy S3 [--strategy S1 ...] --scores data/scores  (every seed of train.seeds; dvc.yaml)
    python -m stages.train --strategy S3 --seed 0 --scores data/scores             (one run)
    python -m stages.train --run S3:0 --run S1:1 --scores data/scores              (any runs)

The runs of one call train together as one stacked network (iqals.train.train_group), each with its own initial
weights, draws and targets, writing exactly what a one-run call writes. --scores is required iff some run needs
scores (dvc.yaml's one-hot strategies, train_onehot, run without it: they do not depend on the score stage or iqa.*).
A checkpoint in checkpoints/ (not a DVC output, so DVC never deletes it) lets an interrupted run resume.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from iqals import train as train_lib
from iqals.data import load_npz
from iqals.errors import UsageError
from iqals.model import pick_device
from iqals.params import Params, Strategy
from stages.common import cli, run, setup


def parse_runs(strategy: list[str], seed: str | None, run: list[str], scores: str | None,
               p: Params) -> list[tuple[Strategy, int]]:
    """The train stage's runs, in one of the module docstring's forms, checked against params.yaml and --scores."""
    if bool(run) == bool(strategy) or (seed is not None and len(strategy) != 1):
        raise UsageError("give --strategy S [--strategy T ...], --strategy S --seed k, or --run S:k ...")
    specs = [r.partition(":")[::2] for r in run] or [
        (s, k) for s in strategy for k in ([seed] if seed is not None else map(str, p.train.seeds))]
    runs = []
    for name, k in specs:
        if name not in p.strategies:
            raise UsageError(f"strategy {name!r}: not in params.yaml strategies {sorted(p.strategies)}")
        if not k.isdigit() or int(k) not in p.train.seeds:
            raise UsageError(f"{name}:{k}: seed not in params.yaml train.seeds {list(p.train.seeds)}")
        if (name, int(k)) in [(s.name, j) for s, j in runs]:
            raise UsageError(f"run {name}:{k} given twice")
        runs.append((p.strategies[name], int(k)))
    needy = [s for s, _ in runs if s.needs_scores]
    if needy and scores is None:
        raise UsageError(f"strategy {needy[0].name} (labels {needy[0].labels}) needs --scores: train it in "
                         "dvc.yaml's train_scored group")
    if not needy and scores is not None:
        raise UsageError(f"strategy {runs[0][0].name} (labels {runs[0][0].labels}) must not read scores: train it in "
                         "dvc.yaml's train_onehot group" + (" (no run given needs --scores)" if len(runs) > 1 else ""))
    return runs


def main() -> None:
    args = cli(__doc__, strategy=[], seed=None, run=[], raw="data/raw", distorted="data/distorted",
               scores=None, models="models", logs="logs", checkpoints="checkpoints", stop_after=None)
    p = setup("train")
    runs = parse_runs(args.strategy, args.seed, args.run, args.scores, p)
    images, labels = load_npz(Path(args.raw) / "train.npz", "train")
    distorted = (np.load(Path(args.distorted) / "train.npy", mmap_mode="r")
                 if any(s.distortions for s, _ in runs) else None)
    scores = np.load(Path(args.scores) / "train.npy") if args.scores else None
    device = pick_device(p.train.device)
    for s, seed in runs:
        logging.info("%s seed %d: %s / %s, %d images, %d epochs on %s", s.name, seed, s.labels, s.train_set,
                     len(labels), p.train.epochs, device)
    data = train_lib.prepare_group(runs, images, labels, distorted, scores, p, device)
    runs = [train_lib.Run(s, k, d, Path(args.models) / f"{s.name}/seed{k}.pt",
                          Path(args.logs) / f"{s.name}/seed{k}.tsv", Path(args.checkpoints) / f"{s.name}/seed{k}.pt")
            for (s, k), d in zip(runs, data)]
    train_lib.train_group(runs, p, device, stop_after=int(args.stop_after) if args.stop_after else None)


if __name__ == "__main__":
    run(main)
