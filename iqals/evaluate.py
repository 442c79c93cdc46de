"""Accuracy, true-class confidence, NLL and ECE of a strategy's trained networks on the ten
test sets and on the corruptions never seen in training, aggregated over seeds."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from . import model as model_lib
from . import stacks
from .data import DataError
from .params import NUM_CLASSES, TEST_SETS, Params

log = logging.getLogger(__name__)


def test_sets(pristine: np.ndarray, distorted: np.ndarray) -> dict[str, np.ndarray]:
    """Name -> uint8 (N, 32, 32, 3) stack, in Table 2's column order (TEST_SETS)."""
    return {"pristine": pristine, **stacks.per_level(distorted, lambda d: d)}


@torch.no_grad()
def predict(net: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int) -> np.ndarray:
    """Softmax probabilities float64 (N, 10) of a uint8 (N, 32, 32, 3) stack."""
    net.eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.tensor(images[i:i + batch]).to(device).permute(0, 3, 1, 2)  # a copy: may be a read-only mmap
        out.append(net(model_lib.standardize(x)).double().softmax(1).cpu())
    return torch.cat(out).numpy()


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(1) == labels))


def true_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return probs[np.arange(len(labels)), labels]


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities floored at 1e-12)."""
    return float(-np.mean(np.log(np.maximum(true_confidence(probs, labels), 1e-12))))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Top-label expected calibration error, equal-width bins (torchmetrics' binning):
    sum over bins of |accuracy - confidence| weighted by the bin's share = |sum of (correct - conf)| / N."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    idx = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), conf, side="right") - 1, 0, bins - 1)
    return float(np.abs(np.bincount(idx, correct - conf, bins)).sum() / len(conf))


def read_model(path: Path) -> dict:
    """A model or checkpoint file, read once: its weights under "model" (model files: "snapshots" too)."""
    if not path.is_file():
        raise DataError(f"{path}: no trained model (run the train stage for it first)")
    return torch.load(path, map_location="cpu", weights_only=False)


def as_net(state: dict, p: Params, device: torch.device) -> torch.nn.Module:
    """The Table 1 network with these weights, on device."""
    net = model_lib.build(p.model, 0)
    net.load_state_dict(state)
    return net.to(device)


def load_model(path: Path, p: Params, device: torch.device) -> torch.nn.Module:
    return as_net(read_model(path)["model"], p, device)


def along_training(snapshots: dict[int, dict], sets: dict[str, np.ndarray], labels: np.ndarray, p: Params,
                   device: torch.device) -> list[dict]:
    """Accuracy on each test set of the weights a run kept every train.snapshot_every epochs (a model
    file's "snapshots": epoch -> weights; none: []), a row per epoch: is it learning, or memorising?"""
    rows = []
    for epoch, state in snapshots.items():
        net = as_net(state, p, device)
        rows.append({"epoch": epoch, **{n: round(accuracy(predict(net, x, device, p.evaluate.batch_size), labels), 5)
                                        for n, x in sets.items()}})
    return rows


def aggregate(per_seed: list[dict[str, dict[str, float]]]) -> dict:
    """Per test set: the mean over seeds of each measure, and the std of accuracy (None with one
    seed: one run says nothing about the spread between runs)."""
    out = {}
    for name in TEST_SETS:
        rows = [r[name] for r in per_seed]
        cell = {k: round(float(np.mean([r[k] for r in rows])), 5) for k in rows[0]}
        cell["acc_std"] = round(float(np.std([r["acc"] for r in rows], ddof=1)), 5) if len(rows) > 1 else None
        out[name] = cell
    return out


def unseen_summary(acc: np.ndarray, families) -> dict:
    """acc (seeds, families, severities) -> per family: mean accuracy and one per severity."""
    out = {f: {"acc": round(float(acc[:, i].mean()), 5),
               "by_severity": [round(float(a), 5) for a in acc[:, i].mean(0)]}
           for i, f in enumerate(families)}
    out["mean"] = round(float(acc.mean()), 5)
    return out


def evaluate_strategy(name: str, files: dict[int, dict], images: np.ndarray, distorted: np.ndarray,
                      corrupted: np.ndarray, labels: np.ndarray, p: Params,
                      device: torch.device) -> tuple[np.ndarray, dict]:
    """Every seed's network (files: seed -> its model file, read_model) on the ten test sets and the
    (families, severities, N, ...) grid of corrupted test images: softmax outputs float32 (seeds,
    test sets, N, 10) and the metrics; the accuracies of any snapshots ("along_training")."""
    want = (len(p.corrupt.families), len(p.corrupt.severities), len(labels))
    if corrupted.shape[:3] != want:
        raise DataError(f"corrupted test set has shape {corrupted.shape[:3]}, expected (families, "
                        f"severities, N) = {want}: rerun the corrupt stage")
    sets, nets = test_sets(images, distorted), {k: as_net(f["model"], p, device) for k, f in files.items()}
    probs = np.zeros((len(nets), len(sets), len(labels), NUM_CLASSES), dtype=np.float32)
    per_seed, unseen = [], []
    for i, (seed, net) in enumerate(nets.items()):
        row = {}
        for j, (set_name, x) in enumerate(sets.items()):
            pr = predict(net, x, device, p.evaluate.batch_size)  # float64: the measures use it unrounded
            probs[i, j] = pr
            row[set_name] = {"acc": accuracy(pr, labels), "conf": float(true_confidence(pr, labels).mean()),
                             "nll": nll(pr, labels), "ece": ece(pr, labels, p.evaluate.ece_bins)}
        per_seed.append(row)
        unseen.append([[accuracy(predict(net, x, device, p.evaluate.batch_size), labels) for x in family]
                       for family in corrupted])  # (families, severities)
        log.info("%s seed %d: pristine acc %.4f", name, seed, row["pristine"]["acc"])
    strategy = p.strategies[name]
    metrics = {"strategy": name, "train_set": strategy.train_set, "labels": strategy.labels,
               "seeds": list(nets), "test_images": len(labels), **aggregate(per_seed),
               "unseen": unseen_summary(np.array(unseen), p.corrupt.families),
               "per_seed_acc": {f"seed{k}": {n: round(r[n]["acc"], 5) for n in TEST_SETS}
                                for k, r in zip(nets, per_seed)}}
    along = {f"seed{k}": along_training(f.get("snapshots", {}), sets, labels, p, device) for k, f in files.items()}
    if any(along.values()):
        metrics["along_training"] = along
    return probs, metrics
