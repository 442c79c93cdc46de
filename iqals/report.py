"""Table 2, the claims checks, controls, seeds and calibration, and Figures 3 and 4.

Pure functions over the evaluate stage's metrics and predictions; stages/report.py does I/O.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .evaluate import TEST_SETS
from .params import DISTORTIONS, Strategy

TABLE2_STRATEGIES = [f"S{i}" for i in range(1, 10)]  # paper Table 2 rows, in order


def markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub markdown table (numbers rounded to `digits`)."""
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def twin(strategies: dict[str, Strategy], name: str, labels: str = "original") -> str | None:
    """The strategy with the same training set and label rule `labels` (S3 -> S2)."""
    s = strategies[name]
    for other in strategies.values():
        if other.train_set == s.train_set and other.labels == labels:
            return other.name
    return None


def table2(metrics: dict[str, dict], paper: pd.DataFrame) -> pd.DataFrame:
    """Our accuracy beside the paper's, per strategy and test set (long -> wide, Table 2 layout)."""
    rows = []
    for name in TABLE2_STRATEGIES:
        if name not in metrics:
            continue
        m = metrics[name]
        ref = paper.loc[paper["strategy"] == int(name[1:])].iloc[0]
        row = {"strategy": name, "regularization": m["labels"], "train_set": m["train_set"]}
        for t in TEST_SETS:
            row[t] = m[t]["acc"]
            row[f"{t}_std"] = m[t]["acc_std"]
            row[f"{t}_paper"] = float(ref[t])
            row[f"{t}_diff"] = m[t]["acc"] - float(ref[t])
        rows.append(row)
    return pd.DataFrame(rows)


def table2_markdown(t2: pd.DataFrame, n_seeds: int) -> str:
    """Cells read 'ours (paper, difference)' in percent; std over seeds when there are several."""
    head = "| S | labels | train set | " + " | ".join(TEST_SETS) + " |"
    lines = [head, "|" + "---|" * (3 + len(TEST_SETS))]
    for _, r in t2.iterrows():
        cells = []
        for t in TEST_SETS:
            ours = f"{100 * r[t]:.1f}" + (f"±{100 * r[f'{t}_std']:.1f}" if n_seeds > 1 else "")
            cells.append(f"{ours} ({100 * r[f'{t}_paper']:.1f}, {100 * r[f'{t}_diff']:+.1f})")
        lines.append(f"| {r['strategy']} | {r['regularization']} | {r['train_set']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def relevant_sets(train_set: str) -> list[str]:
    """Pristine plus the levels of the distortions a mix was trained on (the paper's claim)."""
    types = DISTORTIONS if train_set == "mix_all3" else (train_set.removeprefix("mix_"),)
    return ["pristine"] + [f"{d}_{lv}" for d in types for lv in (1, 2, 3)]


def claim_lines(strategies: dict[str, Strategy], metrics: dict, paper: pd.DataFrame) -> list[str]:
    """One line per IQA-LS strategy of Table 2: does it beat its one-hot twin, here and in the paper?"""
    lines = []
    for name in TABLE2_STRATEGIES:
        if name not in metrics or strategies[name].labels != "iqa_ls":
            continue
        base = twin(strategies, name)
        p_ours = paper.set_index("strategy")
        parts, wins = [], 0
        sets = relevant_sets(strategies[name].train_set)
        for t in sets:
            d = metrics[name][t]["acc"] - metrics[base][t]["acc"]
            dp = p_ours.loc[int(name[1:]), t] - p_ours.loc[int(base[1:]), t]
            wins += d > 0
            parts.append(f"{t} {100 * d:+.1f} (paper {100 * dp:+.1f})")
        lines.append(f"- {name} vs {base}: beats it on {wins} of {len(sets)} sets: " + "; ".join(parts))
    return lines


def mcnemar_p(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Exact two-sided McNemar test on paired per-image correctness (binomial on discordant pairs)."""
    b = int(np.sum(a_correct & ~b_correct))
    c = int(np.sum(~a_correct & b_correct))
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(b, b + c, 0.5).pvalue)


def paired_tests(strategies: dict[str, Strategy], preds: dict[str, dict]) -> pd.DataFrame:
    """Every quality-aware strategy against its one-hot twin, per test set.

    McNemar's exact test pairs the two models' correctness on each (seed, test image); with two
    or more seeds, a paired t-test over the per-seed accuracies is given beside it.
    """
    rows = []
    for name, s in strategies.items():
        base = twin(strategies, name)
        if s.labels == "original" or base is None or name not in preds or base not in preds:
            continue
        a, b = preds[name], preds[base]
        for j, t in enumerate(TEST_SETS):
            ca = a["probs"][:, j].argmax(-1) == a["labels"]  # (seeds, N)
            cb = b["probs"][:, j].argmax(-1) == b["labels"]
            acc_a, acc_b = ca.mean(1), cb.mean(1)
            t_p = float(stats.ttest_rel(acc_a, acc_b).pvalue) if len(acc_a) > 1 else float("nan")
            rows.append({"strategy": name, "labels": s.labels, "twin": base, "test_set": t,
                         "acc": acc_a.mean(), "twin_acc": acc_b.mean(), "diff": acc_a.mean() - acc_b.mean(),
                         "mcnemar_p": mcnemar_p(ca.ravel(), cb.ravel()), "ttest_p": t_p})
    return pd.DataFrame(rows)


def mix_epsilons(strategies: dict[str, Strategy], scores: np.ndarray, cfg, shares) -> dict[str, float]:
    """Per training mix, the mean per-sample IQA-LS epsilon K(1 - T(s))/(K - 1) over an epoch:
    the epsilon the uniform_ls control smooths every image with."""
    from .mixture import mean_epsilon, true_class_probability

    out = {}
    for s in strategies.values():
        if s.train_set != "pristine" and s.train_set not in out:
            probe = Strategy(name="probe", train_set=s.train_set, labels="iqa_ls")
            q = true_class_probability(probe, scores.shape[-1], scores, cfg, shares, 0)
            out[s.train_set] = mean_epsilon(q, probe, shares)
    return out


def controls(strategies: dict[str, Strategy], metrics: dict, epsilons: dict[str, float]) -> pd.DataFrame:
    """Per mix: accuracy of each label rule on pristine and averaged over the mix's own levels,
    beside the mix's mean IQA-LS epsilon (= the uniform_ls control's epsilon)."""
    rows = []
    for name, s in strategies.items():
        if name not in metrics or s.train_set == "pristine":
            continue
        m = metrics[name]
        own = relevant_sets(s.train_set)[1:]
        rows.append({"train_set": s.train_set, "epsilon": epsilons[s.train_set], "labels": s.labels,
                     "strategy": name, "pristine": m["pristine"]["acc"], "pristine_std": m["pristine"]["acc_std"],
                     "own_levels": float(np.mean([m[t]["acc"] for t in own])),
                     "all_distorted": float(np.mean([m[t]["acc"] for t in TEST_SETS[1:]])),
                     "ece_mean": float(np.mean([m[t]["ece"] for t in TEST_SETS])),
                     "nll_mean": float(np.mean([m[t]["nll"] for t in TEST_SETS]))})
    order = {r: i for i, r in enumerate(("original", "iqa_ls", "uniform_ls", "shuffled_ls"))}
    df = pd.DataFrame(rows)
    return df.sort_values(["train_set", "labels"], key=lambda c: c.map(order) if c.name == "labels" else c)


def calibration(metrics: dict, preds: dict, test_scores: np.ndarray) -> pd.DataFrame:
    """ECE and NLL per strategy and test set, and Spearman's rho between the true-class
    confidence and the test image's quality score over the nine distorted test sets (the
    paper's "human-like uncertainty" claim, measured)."""
    rows = []
    quality = test_scores.reshape(9, -1)  # (type*level, N), TEST_SETS[1:] order
    for name, m in metrics.items():
        pr = preds[name]
        conf = np.take_along_axis(pr["probs"][:, 1:], pr["labels"][None, None, :, None], -1)[..., 0]
        rho = stats.spearmanr(conf.mean(0).ravel(), quality.ravel()).statistic
        row = {"strategy": name, "labels": m["labels"], "train_set": m["train_set"], "spearman_conf_quality": rho}
        for t in TEST_SETS:
            row[f"{t}_ece"], row[f"{t}_nll"] = m[t]["ece"], m[t]["nll"]
        rows.append(row)
    return pd.DataFrame(rows)


def unseen(strategies: dict[str, Strategy], metrics: dict, families) -> pd.DataFrame:
    """Mean accuracy per corruption family never seen in training (CIFAR-10-C style)."""
    rows = []
    for name, s in strategies.items():
        u = metrics[name]["unseen"]
        rows.append({"strategy": name, "labels": s.labels, "train_set": s.train_set,
                     **{f: u[f]["acc"] for f in families}, "mean": u["mean"]})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ figures

FIG3_PANELS = [("(a) blur", "blur", ["S1", "S2", "S3"]), ("(b) noise", "noise", ["S1", "S4", "S5"]),
               ("(c) JPEG", "jpeg", ["S1", "S6", "S7"])]


def fig3(metrics: dict, plt):
    """Accuracy vs distortion level; baseline S1 dotted, as in the paper's Figure 3."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), constrained_layout=True)
    levels = [0, 1, 2, 3]
    for ax, (title, kind, names) in zip(axes, FIG3_PANELS):
        for name in names:
            if name in metrics:
                y = [metrics[name]["pristine"]["acc"]] + [metrics[name][f"{kind}_{lv}"]["acc"] for lv in (1, 2, 3)]
                ax.plot(levels, y, ":" if name == "S1" else "-", marker="o", label=name)
        ax.set_title(title)
    ax = axes[3]
    for name, style in (("S8", "--"), ("S9", "-")):
        if name not in metrics:
            continue
        for kind, color in zip(DISTORTIONS, ("C0", "C1", "C2")):
            y = [metrics[name]["pristine"]["acc"]] + [metrics[name][f"{kind}_{lv}"]["acc"] for lv in (1, 2, 3)]
            ax.plot(levels, y, style, color=color, marker="o", label=f"{name} {kind}")
    ax.set_title("(d) mix_all3: S8 (dashed) vs S9")
    for ax in axes:
        ax.set_xticks(levels, ["pristine", "1", "2", "3"])
        ax.set_xlabel("distortion level")
        ax.set_ylabel("top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def fig4(images: np.ndarray, blurred: np.ndarray, labels: np.ndarray, examples, strategy_probs: dict, plt,
         class_names):
    """Example test images at pristine and blur levels 1-3, with each strategy's true-class
    confidence (mean over seeds) under each thumbnail, as in the paper's Figure 4."""
    fig, axes = plt.subplots(len(examples), 4, figsize=(8, 2.4 * len(examples)), constrained_layout=True)
    axes = np.atleast_2d(axes)
    for r, i in enumerate(examples):
        for c in range(4):
            ax = axes[r, c]
            ax.imshow(images[i] if c == 0 else blurred[c - 1, i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            conf = ", ".join(f"{n} {pr[:, c, i, labels[i]].mean():.3f}" for n, pr in strategy_probs.items())
            ax.set_xlabel(conf, fontsize=7)
            if r == 0:
                ax.set_title("pristine" if c == 0 else f"blur level {c}")
            if c == 0:
                ax.set_ylabel(f"#{i} {class_names[labels[i]]}")
    return fig
