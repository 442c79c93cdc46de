"""Paired comparisons of two strategies that respect how the study is built: the same test images recur for every
seed, so (seed, image) pairs are not independent. The primary test resamples images (one draw for every seed,
keeping each image's results together) and seeds (training runs); beside it, per-seed McNemar tests combined over
seeds (Cochran-Mantel-Haenszel) and, with two or more seeds, a paired t-test of the per-seed accuracies."""
from __future__ import annotations

import numpy as np
from scipy import stats


class Bootstrap:
    """Resampling weights drawn once, shared by every comparison (common random numbers): images (B, N) and seeds
    (B, S) counts per replicate (all ones when S = 1: one run says nothing about the variance between runs)."""

    def __init__(self, n_images: int, n_seeds: int, replicates: int, seed: int):
        rng = np.random.default_rng(seed)
        self.images = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=replicates).astype(np.float32)
        self.seeds = (rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=replicates)
                      if n_seeds > 1 else np.ones((replicates, 1))).astype(np.float32)

    def replicates(self, d: np.ndarray) -> np.ndarray:
        """Bootstrap replicates of the mean of d (S seeds, N images) over seeds and images."""
        per_seed = self.images @ d.T.astype(np.float32)  # (B, S): resampled image sums per seed
        return (per_seed * self.seeds).sum(1) / d.size


def bootstrap_test(d: np.ndarray, boot: Bootstrap, level: float = 0.95) -> dict:
    """Mean of the paired differences d (seeds, images), its percentile interval and two-sided p-value (the
    smallest level at which that interval excludes 0)."""
    rep = boot.replicates(d)
    tail = min(np.sum(rep <= 0), np.sum(rep >= 0))
    lo, hi = np.quantile(rep, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "ci_lo": float(lo), "ci_hi": float(hi),
            "p": float(min(1.0, 2 * (tail + 1) / (len(rep) + 1))) if np.any(d) else 1.0}


def cmh_mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Per-seed McNemar tables combined across seeds (Cochran-Mantel-Haenszel for matched pairs):
    chi2 = (sum_k (b_k - c_k))^2 / sum_k (b_k + c_k), 1 degree of freedom; exact binomial for one seed."""
    b, c = np.sum(a_correct & ~b_correct, axis=-1), np.sum(~a_correct & b_correct, axis=-1)
    if b.sum() + c.sum() == 0:
        return 1.0
    if len(b) == 1:
        return float(stats.binomtest(int(b[0]), int(b[0] + c[0]), 0.5).pvalue)
    return float(stats.chi2.sf((b - c).sum() ** 2 / (b + c).sum(), 1))


def paired_t(acc_a: np.ndarray, acc_b: np.ndarray) -> float:
    """Paired t-test of per-seed accuracies; NaN with fewer than two seeds or no variation."""
    if len(acc_a) < 2 or np.all(acc_a - acc_b == (acc_a - acc_b)[0]):
        return float("nan")
    return float(stats.ttest_rel(acc_a, acc_b).pvalue)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (monotone, capped at 1); NaNs are left out and kept."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(np.maximum.accumulate((m - np.arange(m)) * p[order]), 1.0)
    return out
