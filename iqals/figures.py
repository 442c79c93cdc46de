"""The report's figures (Figure 3 beside the paper's, Figure 4, confidence vs quality, training curves) and the
probe's. Made without pyplot: no global state, no backend to choose (savefig renders with Agg)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .data import CLASSES, load_npz
from .io import atomic_path
from .params import DISTORTIONS, LEVELS, TEST_SETS, Params, test_set_name
from .report import true_confidence

PAPER_STYLE = {"alpha": 0.35, "linestyle": "--", "marker": "x"}  # the paper's values: same colour, faint
ALL3_STYLES, ALL3_MARKERS = ("--", "-", "-.", ":"), "os^D"  # the all3 panel's strategies: style, then marker


def _curve(values: dict, kind: str, key: str = "acc") -> list:
    """Pristine then levels 1..3 of one distortion type."""
    t = DISTORTIONS.index(kind)
    return [values["pristine"][key]] + [values[test_set_name(t, lv)][key] for lv in range(LEVELS)]


def fig3(metrics: dict, paper_rows: dict[str, pd.Series], panels: dict[str, list[str]], n_seeds: int):
    """Accuracy vs distortion level: ours solid (error bars: std over seeds, when several), the paper's faint and
    dashed in the same colour, baseline S1 dotted; panel 'all3' shows each type, as the paper's Figure 3(d)."""
    fig = Figure(figsize=(4 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels))
    x = np.arange(LEVELS + 1)
    paper = {n: {t: {"acc": float(r[t])} for t in TEST_SETS} for n, r in paper_rows.items()}

    def line(ax, name, kind, color, style, label, marker="o"):
        m = metrics[name]
        yerr = _curve(m, kind, "acc_std") if n_seeds > 1 else None
        ax.errorbar(x, _curve(m, kind), yerr=yerr, color=color, linestyle=style, marker=marker, capsize=3, label=label)
        if name in paper:
            ax.plot(x, _curve(paper[name], kind), color=color, **PAPER_STYLE)

    for ax, (panel, names) in zip(np.atleast_1d(axes), panels.items()):
        names = [n for n in names if n in metrics]
        if panel in DISTORTIONS:
            for i, name in enumerate(names):
                line(ax, name, panel, f"C{i}", ":" if name == "S1" else "-", name)
        else:  # every type, one colour each; per strategy a line style, and past four strategies a marker too
            for i, name in enumerate(names):
                k = len(ALL3_STYLES)
                style, marker = ALL3_STYLES[i % k], ALL3_MARKERS[i // k % len(ALL3_MARKERS)]
                for kind, color in zip(DISTORTIONS, ("C0", "C1", "C2")):
                    line(ax, name, kind, color, style, f"{name} {kind}", marker)
        ax.plot([], [], color="grey", **PAPER_STYLE, label="paper")
        ax.set(title=f"{panel}: {', '.join(names)}", xlabel="distortion level", ylabel="top-1 accuracy")
        ax.set_xticks(x, ["pristine"] + [str(lv + 1) for lv in range(LEVELS)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def fig4(images: np.ndarray, blurred: np.ndarray, labels: np.ndarray, examples, strategy_probs: dict, class_names):
    """Example test images at pristine and blur levels 1-3, with each strategy's true-class
    confidence (mean over seeds) under each thumbnail, as in the paper's Figure 4."""
    fig = Figure(figsize=(8, 2.4 * len(examples)), layout="constrained")
    axes = fig.subplots(len(examples), LEVELS + 1, squeeze=False)
    for r, i in enumerate(examples):
        for c in range(LEVELS + 1):
            ax = axes[r, c]
            ax.imshow(images[i] if c == 0 else blurred[c - 1, i], interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            ax.set_xlabel(", ".join(f"{n} {pr[:, c, i, labels[i]].mean():.3f}" for n, pr in strategy_probs.items()),
                          fontsize=7)
            if r == 0:
                ax.set_title("pristine" if c == 0 else f"blur level {c}")
            if c == 0:
                ax.set_ylabel(f"#{i} {class_names[labels[i]]}")
    return fig


def confidence_quality(conf: dict[str, np.ndarray], strategies, test_scores: np.ndarray, bins: int):
    """Mean true-class confidence (name -> (types, levels, N)) per quantile bin of the quality score, a panel per
    distortion type (its levels pooled), for the strategies trained on pristine or on that type."""
    fig = Figure(figsize=(5 * len(DISTORTIONS), 3.8), layout="constrained")
    axes = fig.subplots(1, len(DISTORTIONS))
    for t, (ax, kind) in enumerate(zip(axes, DISTORTIONS)):
        s = test_scores[t].ravel()
        edges = np.unique(np.quantile(s, np.linspace(0, 1, bins + 1)))
        which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2)
        centre = np.array([s[which == b].mean() for b in range(len(edges) - 1)])
        for name, c in conf.items():
            if kind not in strategies[name].distortions and strategies[name].distortions:
                continue
            y = np.bincount(which, c[t].ravel(), len(edges) - 1) / np.bincount(which, minlength=len(edges) - 1)
            ax.plot(centre, y, marker=".", label=name)
        ax.set(title=f"{kind}: confidence vs quality", xlabel="quality score of the test image (bin mean)",
               ylabel="true-class confidence")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return fig


def training_curves(logs: dict[str, pd.DataFrame]):
    """Loss and training accuracy per epoch, mean over seeds, one line per strategy."""
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, (name, df) in enumerate(logs.items()):
        mean = df.groupby("epoch")[["loss", "train_acc"]].mean()
        style = "-" if i < 10 else "--"  # more strategies than colours
        for ax, col in zip(axes, ("loss", "train_acc")):
            ax.plot(mean.index, mean[col], style, label=name)
    for ax, title in zip(axes, ("training loss", "training accuracy")):
        ax.set(title=f"{title} (mean over seeds)", xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    return fig


def probe_curves(rows: pd.DataFrame, paper_s1: pd.Series):
    """The memorisation probe: accuracy vs epoch on each test set (a panel per distortion type, pristine and
    training accuracy in each), the paper's S1 at 2,000 epochs as horizontal marks."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, len(DISTORTIONS), sharey=True)
    for ax, kind in zip(axes, DISTORTIONS):
        ax.plot(rows.epoch, rows.train_acc, color="k", linestyle=":", label="train (eval mode)")
        ax.plot(rows.epoch, rows.pristine, color="k", marker=".", label="pristine")
        for lv, color in zip(range(LEVELS), ("tab:blue", "tab:orange", "tab:red")):
            name = test_set_name(DISTORTIONS.index(kind), lv)
            ax.plot(rows.epoch, rows[name], color=color, marker=".", label=name)
            ax.axhline(float(paper_s1[name]), color=color, **PAPER_STYLE)
        ax.axhline(float(paper_s1["pristine"]), color="k", **PAPER_STYLE)
        ax.set(title=f"S1 on {kind} (paper dashed)", xlabel="epoch at constant lr")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("top-1 accuracy")
    return fig


def save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_all(p: Params, d: dict, a: dict[str, Path]) -> None:
    """The report's four figures, from its inputs `d` (report.read_inputs) and paths `a` (raw, distorted, logs, out)."""
    preds, r = d["preds"], p.report
    images, labels = load_npz(a["raw"] / "test.npz", "test")
    blurred = np.load(a["distorted"] / "test.npy", mmap_mode="r")[0]
    conf = {n: true_confidence(preds[n]) for n in p.strategies}
    logs = {n: pd.concat([pd.read_csv(a["logs"] / n / f"seed{k}.tsv", sep="\t") for k in p.train.seeds])
            for n in p.strategies}
    save_png(fig3(d["metrics"], d["paper_rows"], r.fig3_panels, len(p.train.seeds)), a["out"] / "fig3.png")
    save_png(fig4(images, blurred, labels, [i for i in r.fig4_examples if i < len(labels)],
                  {n: preds[n]["probs"] for n in r.fig4_strategies}, CLASSES), a["out"] / "fig4.png")
    save_png(confidence_quality(conf, p.strategies, d["scores"]["test"], r.quality_bins),
             a["out"] / "confidence_quality.png")
    save_png(training_curves(logs), a["out"] / "training.png")
