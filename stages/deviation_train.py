"""Stage deviation_train: params.yaml's deviation.strategy (S1) on the full training set (iqals/longrun.py).

--schedule converged -> models/deviation/converged.pt: deviation.converged's schedule, the convention study's model.
--schedule probe -> models/deviation/probe.pt, plots/deviation_probe.csv: deviation.probe.epochs at constant lr,
evaluated every eval_every epochs on the ten test sets and training images. Both resume from checkpoints/deviation/.
"""
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from iqals import data, longrun
from iqals.errors import UsageError
from iqals.io import atomic_path
from iqals.model import pick_device
from stages.common import cli, run, setup


def main() -> None:
    args = cli(__doc__, schedule=None, raw="data/raw", distorted="data/distorted", cache="data/cache",
               models="models/deviation", logs="logs/deviation", checkpoints="checkpoints/deviation", plots="plots")
    p = setup("deviation_train")
    if args.schedule not in ("converged", "probe"):
        raise UsageError(f"--schedule {args.schedule}: expected converged or probe")
    d, name = p.deviation, args.schedule
    loaded, _ = data.acquire(args.cache)
    keep = data.subset_indices(loaded, d.train_size, None)["train"]
    images, labels = loaded["train"][0][keep], loaded["train"][1][keep]
    device = pick_device(p.train.device)
    paths = Path(args.models) / f"{name}.pt", Path(args.logs) / f"{name}.tsv", Path(args.checkpoints) / f"{name}.pt"
    logging.info("%s seed %d, %s schedule: %d training images on %s", d.strategy, d.seed, name, len(labels), device)
    if name == "converged":
        q = longrun.schedule_params(p, d.converged.epochs, d.converged.lr_decay_epochs)
        longrun.train_run(q, images, labels, *paths, device)
        return
    test_images, test_labels = data.load_npz(Path(args.raw) / "test.npz", "test")
    distorted = np.load(Path(args.distorted) / "test.npy", mmap_mode="r")
    rows = longrun.probe(p, images, labels, test_images, distorted, test_labels, *paths, device)
    with atomic_path(Path(args.plots) / "deviation_probe.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


if __name__ == "__main__":
    run(main)
