"""Stage evaluate: one strategy's models (every seed) on the ten test sets; `--strategy` repeated evaluates several
in one process (the GPU study does), writing what one-strategy calls write; without it, every strategy of params.yaml.

metrics/<strategy>.json: per test set, mean over seeds of accuracy, true-class confidence, NLL and ECE, and accuracy's
std; per seed, the accuracies; under "unseen", each corruption family's accuracy (none used in training; mean over
severities and seeds); under "along_training", each seed's ten test-set accuracies every train.snapshot_every epochs.
data/predictions/<strategy>.npz: softmax float32 (seeds, test sets, N, 10), for the report (Figure 4, correlations).
"""
from pathlib import Path

import numpy as np

from iqals import evaluate
from iqals.data import load_npz
from iqals.errors import UsageError
from iqals.io import save_npz, write_json
from iqals.model import pick_device
from stages.common import cli, run, setup


def main() -> None:
    args = cli(__doc__, strategy=[], raw="data/raw", distorted="data/distorted", corrupted="data/corrupted",
               models="models", metrics="metrics", predictions="data/predictions")
    p = setup("evaluate")
    names = list(dict.fromkeys(args.strategy or p.strategies))
    if unknown := [name for name in names if name not in p.strategies]:
        raise UsageError(f"--strategy {unknown[0]}: not in params.yaml strategies {sorted(p.strategies)}")
    device = pick_device(p.train.device)
    images, labels = load_npz(Path(args.raw) / "test.npz", "test")
    distorted, corrupted = (np.load(Path(d) / "test.npy", mmap_mode="r") for d in (args.distorted, args.corrupted))
    for name in names:
        files = {k: evaluate.read_model(Path(args.models) / name / f"seed{k}.pt") for k in p.train.seeds}
        probs, metrics = evaluate.evaluate_strategy(name, files, images, distorted, corrupted, labels, p, device)
        save_npz(Path(args.predictions) / f"{name}.npz", probs=probs, labels=labels,
                 seeds=np.array(p.train.seeds), test_sets=np.array(evaluate.TEST_SETS))
        write_json(Path(args.metrics) / f"{name}.json", metrics)  # last: metrics mean both are written


if __name__ == "__main__":
    run(main)
