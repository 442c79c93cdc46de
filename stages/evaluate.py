"""Stage evaluate: one strategy's models (every seed) on the ten test sets.

metrics/<strategy>.json: per test set, mean over seeds of accuracy, true-class confidence, NLL
and ECE (and the std of accuracy); per seed, the accuracies; under "unseen", the accuracy on
each corruption family never used in training (data/corrupted), mean over severities and seeds. data/predictions/<strategy>.npz:
softmax outputs float32 (seeds, test sets, N, 10), for the report (Figure 4, correlations).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from iqals import evaluate as ev
from iqals import model as model_lib
from iqals.data import load_npz
from iqals.io import save_npz, write_json
from stages.common import run, setup

log = logging.getLogger("evaluate")


def load_model(path: Path, p, device) -> torch.nn.Module:
    if not path.is_file():
        raise ValueError(f"{path}: no trained model (run the train stage for it first)")
    net = model_lib.build(p.model, 0)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
    return net.to(device)


def aggregate(per_seed: list[dict[str, dict[str, float]]]) -> dict:
    out = {}
    for name in ev.TEST_SETS:
        rows = [r[name] for r in per_seed]
        cell = {k: round(float(np.mean([r[k] for r in rows])), 5) for k in rows[0]}
        cell["acc_std"] = round(float(np.std([r["acc"] for r in rows], ddof=1)) if len(rows) > 1 else 0.0, 5)
        out[name] = cell
    return out


def unseen_summary(acc: np.ndarray, cfg) -> dict:
    """acc (seeds, families, severities) -> per family: mean accuracy and one per severity."""
    out = {f: {"acc": round(float(acc[:, i].mean()), 5),
               "by_severity": [round(float(a), 5) for a in acc[:, i].mean(0)]}
           for i, f in enumerate(cfg.families)}
    out["mean"] = round(float(acc.mean()), 5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--strategy", required=True)
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--distorted", default="data/distorted")
    ap.add_argument("--corrupted", default="data/corrupted")
    ap.add_argument("--models", default="models")
    ap.add_argument("--metrics", default="metrics")
    ap.add_argument("--predictions", default="data/predictions")
    args = ap.parse_args()
    p = setup("evaluate")
    if args.strategy not in p.strategies:
        raise ValueError(f"--strategy {args.strategy}: not in params.yaml strategies {sorted(p.strategies)}")
    device = model_lib.pick_device(p.train.device)
    images, labels = load_npz(Path(args.raw) / "test.npz", "test")
    sets = ev.test_sets(images, np.load(Path(args.distorted) / "test.npy", mmap_mode="r"))
    nets = {k: load_model(Path(args.models) / args.strategy / f"seed{k}.pt", p, device) for k in p.train.seeds}
    probs = np.zeros((len(nets), len(sets), len(labels), 10), dtype=np.float32)
    per_seed, unseen = [], []
    corrupted = np.load(Path(args.corrupted) / "test.npy", mmap_mode="r")  # (families, severities, N, ...)
    if corrupted.shape[:3] != (len(p.corrupt.families), len(p.corrupt.severities), len(labels)):
        raise ValueError(f"{args.corrupted}/test.npy has shape {corrupted.shape[:3]}, expected "
                         f"(families, severities, N) = ({len(p.corrupt.families)}, "
                         f"{len(p.corrupt.severities)}, {len(labels)}): rerun the corrupt stage")
    for i, (seed, net) in enumerate(nets.items()):
        row = {}
        for j, (name, x) in enumerate(sets.items()):
            pr = ev.predict(net, x, device, p.evaluate.batch_size)
            probs[i, j] = pr
            row[name] = ev.summarize(pr, labels, p.evaluate.ece_bins)
        per_seed.append(row)
        unseen.append(ev.accuracy_grid(net, corrupted, labels, device, p.evaluate.batch_size))
        log.info("%s seed %d: pristine acc %.4f", args.strategy, seed, row["pristine"]["acc"])
    save_npz(Path(args.predictions) / f"{args.strategy}.npz", probs=probs, labels=labels,
             seeds=np.array(p.train.seeds), test_sets=np.array(ev.TEST_SETS))
    result = {"strategy": args.strategy, **{k: v for k, v in vars(p.strategies[args.strategy]).items() if k != "name"},
              "seeds": list(p.train.seeds), "test_images": len(labels), **aggregate(per_seed),
              "unseen": unseen_summary(np.array(unseen), p.corrupt),
              "per_seed_acc": {f"seed{k}": {n: round(r[n]["acc"], 5) for n in ev.TEST_SETS}
                               for k, r in zip(p.train.seeds, per_seed)}}
    write_json(Path(args.metrics) / f"{args.strategy}.json", result)


if __name__ == "__main__":
    run(main)
