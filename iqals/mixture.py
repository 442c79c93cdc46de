"""What a strategy trains on: the per-epoch draw of copies and the target of each copy.

Copies of the training set are numbered as params.copy_index gives: 0 = pristine, then each
distortion type (DISTORTIONS order) at each level. Everything here is index bookkeeping on small tensors;
the images themselves never leave the device (iqals/train.py).
"""
from __future__ import annotations

import numpy as np
import torch

from .data import DataError
from .params import DISTORTIONS, IQA, LEVELS, NUM_CLASSES, NUM_COPIES, Strategy, copy_index
from .seeds import derive_seed


def level_counts(n: int, shares: tuple[float, ...]) -> list[int]:
    """Exact counts per epoch: floor(share * n) for levels 1-3, the rest pristine (docs/protocol.md, "mixture draw")."""
    levels = [int(np.floor(s * n + 1e-9)) for s in shares[1:]]
    return [n - sum(levels)] + levels


def epoch_draw(n: int, strategy: Strategy, shares, seed: int, epoch: int):
    """(copy, image) pairs of one epoch in batch order, as int64 tensors of length n.

    Seeded by (seed, epoch) alone, so an epoch's draw never depends on earlier epochs: a resumed
    run sees exactly the draws an uninterrupted one would, and mixes trained with the same seed
    see the same images in the same order at the same levels (paired comparisons). A pristine
    draw takes no slots, so its order is not the mixes'.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "draw", epoch))
    copy = torch.zeros(n, dtype=torch.int64)
    types = [DISTORTIONS.index(t) for t in strategy.distortions]
    if types:
        slots = torch.randperm(n, generator=g)
        start = 0
        for level, count in enumerate(level_counts(n, shares)):
            idx = slots[start:start + count]
            start += count
            if level == 0:
                continue
            t = torch.tensor(types)[torch.randint(len(types), (count,), generator=g)]
            copy[idx] = copy_index(t, level - 1)
    order = torch.randperm(n, generator=g)
    return copy[order], order


def true_class_probability(strategy: Strategy, n: int, scores: np.ndarray | None, cfg: IQA,
                           shares, seed: int) -> np.ndarray:
    """q(y) of every copy of each of the n images: float64 (10, n); row 0 (pristine) is 1.

    original: 1 everywhere (one-hot). iqa_ls: Eq. (2), T(s) clipped. shuffled_ls: the same values
    permuted within each level, across images (and types, for mix_all3), so every epoch smooths
    exactly as much as iqa_ls. uniform_ls: one epsilon for every image, pristine included, equal
    to the mean IQA-LS epsilon K(1 - T)/(K - 1) over the epoch mixture.
    `scores` is float64 (types, levels, n) from the score stage.
    """
    q = np.ones((NUM_COPIES, n))
    if strategy.labels == "original":
        return q
    if scores is None or scores.shape != (len(DISTORTIONS), LEVELS, n):
        raise DataError(f"strategy {strategy.name} ({strategy.labels}) needs scores of shape "
                         f"{(len(DISTORTIONS), LEVELS, n)}, got {None if scores is None else scores.shape}")
    from .iqa import target_probability  # here, so one-hot training never imports IQA code

    target = target_probability(scores, cfg)
    rng = np.random.default_rng(derive_seed(seed, "shuffle", strategy.name))
    for lv in range(LEVELS):
        types = [DISTORTIONS.index(d) for d in strategy.distortions]
        rows = [copy_index(t, lv) for t in types]
        q[rows] = target[types, lv]
        if strategy.labels == "shuffled_ls":
            # within a level only: an epoch draws the levels in unequal shares, so permuting across
            # levels would change the amount of smoothing; this breaks only which image gets which score
            q[rows] = rng.permutation(q[rows].ravel()).reshape(len(rows), n)
    if strategy.labels == "uniform_ls":
        q[:] = 1 - mean_epsilon(q, strategy, shares) * (NUM_CLASSES - 1) / NUM_CLASSES
    return q


def mean_epsilon(q: np.ndarray, strategy: Strategy, shares) -> float:
    """Mean per-sample IQA-LS epsilon K(1 - q)/(K - 1) over one epoch's expected mixture."""
    k = NUM_CLASSES
    eps = 0.0  # pristine share contributes epsilon 0
    for lv in range(LEVELS):
        rows = [copy_index(DISTORTIONS.index(d), lv) for d in strategy.distortions]
        eps += shares[lv + 1] * float(np.mean(k * (1 - q[rows]) / (k - 1)))
    return eps


def soft_targets(labels: torch.Tensor, q_true: torch.Tensor) -> torch.Tensor:
    """Eq. (2): q_true on the true class, (1 - q_true)/(K - 1) on each other class."""
    q = ((1 - q_true) / (NUM_CLASSES - 1)).unsqueeze(1).expand(-1, NUM_CLASSES).clone()
    q.scatter_(1, labels.unsqueeze(1), q_true.unsqueeze(1))
    return q
