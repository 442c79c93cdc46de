"""Accuracy, true-class confidence, NLL and ECE of a trained network on the ten test sets."""
from __future__ import annotations

import numpy as np
import torch

from . import model as model_lib
from .params import DISTORTIONS, LEVELS, TEST_SETS, test_set_name


def test_sets(pristine: np.ndarray, distorted: np.ndarray) -> dict[str, np.ndarray]:
    """Name -> uint8 (N, 32, 32, 3) stack, in Table 2's column order."""
    out = {"pristine": pristine}
    for t in range(len(DISTORTIONS)):
        for lv in range(LEVELS):
            out[test_set_name(t, lv)] = distorted[t, lv]
    return out


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
    """Top-label expected calibration error, equal-width bins (torchmetrics' binning)."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def summarize(probs: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, float]:
    return {"acc": accuracy(probs, labels), "conf": float(true_confidence(probs, labels).mean()),
            "nll": nll(probs, labels), "ece": ece(probs, labels, bins)}


def accuracy_grid(net: torch.nn.Module, stacks: np.ndarray, labels: np.ndarray, device: torch.device,
                  batch: int) -> np.ndarray:
    """Accuracy on each stack of a (A, B, N, 32, 32, 3) grid (e.g. corruption family x severity)."""
    out = np.zeros(stacks.shape[:2])
    for a in range(stacks.shape[0]):
        for b in range(stacks.shape[1]):
            out[a, b] = accuracy(predict(net, stacks[a, b], device, batch), labels)
    return out
