"""Stage evaluate: one strategy's models (every seed) on the ten test sets; `--strategy` repeated
evaluates several in one process (the GPU study does), writing what each one-strategy call writes;
without `--strategy`, every strategy of params.yaml.

metrics/<strategy>.json: per test set, mean over seeds of accuracy, true-class confidence, NLL
and ECE (and the std of accuracy); per seed, the accuracies; under "unseen", the accuracy on
each corruption family never used in training (data/corrupted), mean over severities and seeds;
with train.snapshot_every, under "along_training", each seed's accuracies on the ten test sets
every that many epochs.
data/predictions/<strategy>.npz: softmax outputs float32 (seeds, test sets, N, 10), for the
report (Figure 4, correlations).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from iqals import evaluate
from iqals import model as model_lib
from iqals.data import load_npz
from iqals.errors import UsageError
from iqals.io import save_npz, write_json
from stages.common import cli, run, setup


def main() -> None:
    args = cli(__doc__, strategy=[], raw="data/raw", distorted="data/distorted", corrupted="data/corrupted",
               models="models", metrics="metrics", predictions="data/predictions")
    p = setup("evaluate")
    names = list(dict.fromkeys(args.strategy or p.strategies))
    for name in names:
        if name not in p.strategies:
            raise UsageError(f"--strategy {name}: not in params.yaml strategies {sorted(p.strategies)}")
    device = model_lib.pick_device(p.train.device)
    images, labels = load_npz(Path(args.raw) / "test.npz", "test")
    distorted = np.load(Path(args.distorted) / "test.npy", mmap_mode="r")
    corrupted = np.load(Path(args.corrupted) / "test.npy", mmap_mode="r")
    for name in names:
        paths = {k: Path(args.models) / name / f"seed{k}.pt" for k in p.train.seeds}
        nets = {k: evaluate.load_model(path, p, device) for k, path in paths.items()}
        probs, metrics = evaluate.evaluate_strategy(name, nets, images, distorted, corrupted, labels, p, device,
                                                    paths)
        save_npz(Path(args.predictions) / f"{name}.npz", probs=probs, labels=labels,
                 seeds=np.array(p.train.seeds), test_sets=np.array(evaluate.TEST_SETS))
        write_json(Path(args.metrics) / f"{name}.json", metrics)  # last: metrics mean both are written


if __name__ == "__main__":
    run(main)
