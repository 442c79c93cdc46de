"""Table 2, its cells against the paper, controls, calibration, unseen corruptions, and the report's text:
pure functions of the evaluate stage's outputs (`build`) between the stages' `read_inputs` and `write`."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from . import claims, stats
from .data import SPLITS, DataError, official_index
from .io import atomic_path, read_json, write_text
from .params import DISTORTIONS, LABEL_RULES, LEVELS, TEST_SETS, Params, Strategy
from .seeds import derive_seed

log = logging.getLogger("report")
KINDS = ("pristine-trained", "mix, own type", "mix, other type", "mix, pristine")  # of Table 2 cells


def md_table(header, rows) -> str:
    """A GitHub markdown table from its header and rows of formatted cells."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub markdown table (numbers rounded to `digits`, missing as n/a)."""
    def fmt(v) -> str:
        if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
            return "n/a"
        return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)

    return md_table(df.columns, ([fmt(v) for v in row] for row in df.itertuples(index=False)))


def paper_by_name(paper: pd.DataFrame, names) -> dict[str, pd.Series]:
    """The paper's Table 2 rows keyed by our strategy names (report.table2 lists them in its order)."""
    return {n: paper.iloc[i] for i, n in enumerate(names)}


def write(out: Path, tables: dict[str, pd.DataFrame], texts: dict[str, str]) -> None:
    """Tables as name.csv (5 significant digits), texts as files, into out."""
    for name, df in tables.items():
        with atomic_path(out / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False, float_format="%.5g")
    for name, text in texts.items():
        write_text(out / name, text)


def table2(metrics: dict[str, dict], paper_rows: dict[str, pd.Series]) -> pd.DataFrame:
    """Our accuracy beside the paper's, per strategy and test set (Table 2 layout)."""
    rows = []
    for name, ref in paper_rows.items():
        if name not in metrics:
            continue
        m = metrics[name]
        row = {"strategy": name, "regularization": m["labels"], "train_set": m["train_set"]}
        for t in TEST_SETS:
            acc, paper = m[t]["acc"], float(ref[t])
            row.update({t: acc, f"{t}_std": m[t]["acc_std"], f"{t}_paper": paper, f"{t}_diff": acc - paper})
        rows.append(row)
    return pd.DataFrame(rows)


def table2_markdown(t2: pd.DataFrame, n_seeds: int) -> str:
    """Cells read 'ours (paper, difference)' in percent; ± std over seeds when there are several."""
    return md_table(["S", "labels", "train set", *TEST_SETS], (
        [r["strategy"], r["regularization"], r["train_set"]]
        + [f"{100 * r[t]:.1f}" + (f"±{100 * r[f'{t}_std']:.1f}" if n_seeds > 1 else "")
           + f" ({100 * r[f'{t}_paper']:.1f}, {100 * r[f'{t}_diff']:+.1f})" for t in TEST_SETS]
        for _, r in t2.iterrows()))


def cell_kind(train_set: str, test_set: str) -> str:
    """A pristine-trained row's cell, or a mix's on pristine, on its own distortion type or on another."""
    if train_set == "pristine":
        return KINDS[0]
    if test_set == "pristine":
        return KINDS[3]
    own = test_set.rsplit("_", 1)[0] in (DISTORTIONS if train_set == "mix_all3" else (train_set[4:],))
    return KINDS[1] if own else KINDS[2]


def deviations(t2: pd.DataFrame, n_test: int, n_seeds: int, n_paper: int) -> pd.DataFrame:
    """One row per Table 2 cell: ours (p), the paper's (q), the difference in points and in standard errors
    sqrt(p(1-p)/n_test + std^2/n_seeds + q(1-q)/n_paper) (the seeds' spread only where there are several)."""
    rows = []
    for _, r in t2.iterrows():
        for t in TEST_SETS:
            ours, paper, std = r[t], r[f"{t}_paper"], r[f"{t}_std"]
            var = ours * (1 - ours) / n_test + paper * (1 - paper) / n_paper
            if n_seeds > 1 and std is not None and np.isfinite(std):
                var += std**2 / n_seeds
            se = float(np.sqrt(var))
            rows.append({"strategy": r["strategy"], "train_set": r["train_set"], "test_set": t,
                         "kind": cell_kind(r["train_set"], t), "ours": ours, "paper": paper,
                         "diff_points": 100 * (ours - paper), "se_points": 100 * se,
                         "z": (ours - paper) / se if se > 0 else float("nan")})
    return pd.DataFrame(rows)


def within_points(diff_points, bound: float):
    """|difference in points| <= 100 bound. 100 (ours - paper) rounds by ~1e-13 points, real differences
    step by 1/n (>= 1e-4 points): the 1e-9 slack counts a cell exactly on the bound whichever way it rounds."""
    return np.abs(diff_points) <= 100 * bound + 1e-9


def deviation_summary(dev: pd.DataFrame, within: float) -> pd.DataFrame:
    """Per kind of cell (and all): cells, how many lie within `within` of the paper, the mean
    difference, the mean |z| and how many lie above the paper."""
    groups = [*((k, dev[dev.kind == k]) for k in KINDS), ("all", dev)]
    return pd.DataFrame([{"kind": kind, "cells": len(g), "within": int(within_points(g.diff_points, within).sum()),
                          "mean_diff_points": g.diff_points.mean(), "mean_abs_z": g.z.abs().mean(),
                          "above_paper": int((g.diff_points > 0).sum())} for kind, g in groups if len(g)])


def deviation_grid(dev: pd.DataFrame) -> str:
    """Markdown: strategy x test set, each cell 'difference in points (z)'."""
    return md_table(["S", "train set", *TEST_SETS], (
        [name, ts, *(f"{r.diff_points:+.1f} ({r.z:+.1f})" for r in g.itertuples())]
        for (name, ts), g in dev.groupby(["strategy", "train_set"], sort=False)))


def mix_epsilons(strategies: dict[str, Strategy], scores: np.ndarray, cfg, shares) -> dict[str, float]:
    """Per training mix, the mean per-sample IQA-LS epsilon K(1 - T(s))/(K - 1) over an epoch:
    the epsilon the uniform_ls control smooths every image with."""
    from .mixture import mean_epsilon, true_class_probability  # here: the deviation stage imports this module

    probes = [Strategy(name="probe", train_set=mix, labels="iqa_ls") for mix in claims.mixes(strategies)]
    return {s.train_set: mean_epsilon(true_class_probability(s, scores.shape[-1], scores, cfg, shares, 0), s, shares)
            for s in probes}


def controls(strategies: dict[str, Strategy], metrics: dict, epsilons: dict[str, float], claim_levels) -> pd.DataFrame:
    """Per mix: accuracy of each label rule on pristine and over the claim sets' distorted levels,
    beside the mix's mean IQA-LS epsilon (= the uniform_ls control's epsilon)."""
    rows = []
    for name, s in sorted(strategies.items(), key=lambda kv: (kv[1].train_set, LABEL_RULES.index(kv[1].labels))):
        if name not in metrics or not s.distortions:
            continue
        m = metrics[name]
        rows.append({"train_set": s.train_set, "epsilon": epsilons[s.train_set], "labels": s.labels,
                     "strategy": name, "pristine": m["pristine"]["acc"], "pristine_std": m["pristine"]["acc_std"],
                     "claim_levels": float(np.mean([m[t]["acc"] for t in claims.claim_sets(s, claim_levels)[1:]])),
                     "all_distorted": float(np.mean([m[t]["acc"] for t in TEST_SETS[1:]])),
                     "ece_mean": float(np.mean([m[t]["ece"] for t in TEST_SETS])),
                     "nll_mean": float(np.mean([m[t]["nll"] for t in TEST_SETS]))})
    return pd.DataFrame(rows)


def true_confidence(pred: dict) -> np.ndarray:
    """float (types, levels, N): the softmax probability of the true class on each distorted set, mean over seeds."""
    conf = np.take_along_axis(pred["probs"], pred["labels"][None, None, :, None], -1)[..., 0].astype(np.float64)
    return conf.mean(0)[1:].reshape(len(DISTORTIONS), LEVELS, -1)


def calibration(metrics: dict, preds: dict, test_scores: np.ndarray) -> pd.DataFrame:
    """ECE and NLL per strategy and test set, and per distortion type (their score scales differ) Spearman's rho
    between the true-class confidence and the test image's quality score: does confidence follow quality?"""
    rows = []
    for name, m in metrics.items():
        conf = true_confidence(preds[name])
        row = {"strategy": name, "labels": m["labels"], "train_set": m["train_set"]}
        for t, d in enumerate(DISTORTIONS):
            row[f"rho_{d}"] = scipy_stats.spearmanr(conf[t].ravel(), test_scores[t].ravel()).statistic
        for t in TEST_SETS:
            row[f"{t}_ece"], row[f"{t}_nll"] = m[t]["ece"], m[t]["nll"]
        rows.append(row)
    return pd.DataFrame(rows)


def along_training(metrics: dict, every: int) -> str:
    """The report's section on the runs' accuracies every `every` epochs (train.snapshot_every;
    the evaluate stage's along_training), or nothing when no run kept snapshots."""
    along = pd.DataFrame([{"strategy": n, "seed": k, **row} for n, m in metrics.items()
                          for k, rows in m.get("along_training", {}).items() for row in rows])
    if along.empty:
        return ""
    return "\n".join(["### Along training: learning or memorising?", "",
                      f"Accuracy of each run's weights every {every} epochs on the ten test sets:", "",
                      markdown(along), ""])


def regime(p: Params, n_train: int, n_full: int, n_test: int, s1_acc: float | None, s1_paper: float | None) -> str:
    """What the run is, the standard error of one cell, and whether it can speak to the paper."""
    seeds = list(p.train.seeds)
    acc = s1_acc if s1_acc is not None else 0.5
    se = 100 * np.sqrt(acc * (1 - acc) / n_test)
    text = (f"This run: {n_train} training images, {p.train.epochs} epochs (lr x{p.train.lr_decay:g} every "
            f"{p.train.lr_decay_epochs}), {len(seeds)} seed(s) {seeds}, {n_test} test images, quality measure "
            f"{p.iqa.metric} ({p.iqa.transform}), loss {p.train.loss}. The binomial standard error of one "
            f"accuracy cell is {se:.1f} points (at {'S1' if s1_acc is not None else 'an'} accuracy of "
            f"{100 * acc:.1f}%).")
    reasons = ["it has one seed, so the variance between training runs is unknown"] if len(seeds) == 1 else []
    if n_train < n_full:
        reasons.append(f"it trains on {n_train} of the {n_full} training images")
    if (s1_acc is not None and s1_paper is not None
            and not within_points(100 * (s1_acc - s1_paper), p.report.s1_tolerance)):
        reasons.append(f"S1 reaches {100 * s1_acc:.1f}% where the paper reports {100 * s1_paper:.1f}%: "
                       "the network is not in the paper's regime")
    if reasons:
        text += " **This run cannot confirm or refute the paper:** " + "; ".join(reasons) + "."
    return text


def build(p: Params, metrics: dict, preds: dict, paper_rows: dict, scores: dict, n_train: int, n_full: int,
          clipped: int, not_evaluated: list[str] = ()) -> dict:
    """Every table, the report's markdown and the summary, from the evaluate stage's outputs
    (`not_evaluated`: strategies of the run without results, left out of `p` and named)."""
    r, n_seeds, n_test = p.report, len(p.train.seeds), len(next(iter(preds.values()))["labels"])
    boot = stats.Bootstrap(n_test, n_seeds, r.bootstrap, derive_seed(p.base.seed, "report bootstrap"))
    comps = claims.comparisons(p.strategies, preds, r.claim_levels, boot, r.alpha)
    epsilons = mix_epsilons(p.strategies, scores["train"], p.iqa, p.mixture.shares)
    tables = {"table2": table2(metrics, paper_rows), "comparisons": comps, "family_counts": claims.family_counts(comps),
              "controls": controls(p.strategies, metrics, epsilons, r.claim_levels),
              "calibration": calibration(metrics, preds, scores["test"]),
              "unseen": pd.DataFrame([{"strategy": n, "labels": s.labels, "train_set": s.train_set,
                                       **{f: metrics[n]["unseen"][f]["acc"] for f in p.corrupt.families},
                                       "mean": metrics[n]["unseen"]["mean"]} for n, s in p.strategies.items()])}
    tables["deviations"] = deviations(tables["table2"], n_test, n_seeds, r.paper_test_size)
    dev_summary = deviation_summary(tables["deviations"], r.within)
    s1 = next((n for n in r.table2 if n in metrics), None)
    regime_text = regime(p, n_train, n_full, n_test, metrics[s1]["pristine"]["acc"] if s1 else None,
                         float(paper_rows[s1]["pristine"]) if s1 else None)
    if not_evaluated:
        regime_text += (f" **Not evaluated:** {', '.join(not_evaluated)} (no metrics or predictions in this "
                        "run's results): they are absent from every table and from the comparisons that need them.")
    t2_md, conclusions = table2_markdown(tables["table2"], n_seeds), claims.conclusion_lines(comps, r.alpha)
    levels = ", ".join(str(lv) for lv in r.claim_levels)
    seeds_note = "images and seeds" if n_seeds > 1 else "images only (one seed: training-run variance is not included)"
    md = "\n".join([
        "### Table 2, regenerated", "", regime_text, "",
        "Each cell: our top-1 accuracy in %" + (" ± std over seeds" if n_seeds > 1 else "")
        + " (the paper's, our difference).", "", t2_md,
        "### How far from the paper: every cell in standard errors", "",
        f"Our difference from the paper in points (in standard errors: binomial on our {n_test} and the paper's "
        f"{r.paper_test_size} test images" + (f", and the spread of our {n_seeds} seeds" if n_seeds > 1 else "")
        + f"); cells within {100 * r.within:.0f} points per kind of cell (deviations.csv). The measurements of "
        "why are in deviation.md (the deviation stage).", "",
        deviation_grid(tables["deviations"]), "", markdown(dev_summary, 2), "",
        f"### Does IQA-LS beat its one-hot twin? Judged on pristine and levels {levels} of the mix's own "
        "distortions (the paper's claim); level 3 stays in the tables", "",
        f"Differences in points with 95% intervals from a bootstrap over {seeds_note} ({r.bootstrap} replicates), "
        "beside the paper's difference:", "", *claims.claim_lines(p.strategies, comps, paper_rows, r.claim_levels), "",
        "### Conclusions per mix", "",
        f"Computed on the claim sets (per-image mean over pristine and levels {levels}): better / worse when the "
        f"Holm-corrected p < {r.alpha:g}, else indistinguishable.", "", *conclusions, "",
        "### Controls: is it the quality signal or just smoothing?", "",
        "uniform_ls asks *is it the amount of smoothing?* (every image smoothed with the mix's mean IQA-LS "
        "epsilon); shuffled_ls asks *is it which image gets which score?* (IQA-LS targets permuted within "
        "each level, so each epoch smooths exactly as much). Accuracy on pristine and over the claim sets' "
        "distorted levels; ECE and NLL averaged over the ten test sets.", "",
        markdown(tables["controls"]), "",
        f"Tests per family (Holm within each family; primary test: bootstrap over {seeds_note}; beside it in "
        "comparisons.csv (beside this report): per-seed McNemar combined over seeds by Cochran-Mantel-Haenszel, "
        "and a paired t-test of per-seed accuracies when there are two or more seeds):", "",
        markdown(tables["family_counts"]), "",
        "### Calibration and confidence vs quality", "",
        "Spearman's rho between the true-class confidence (mean over seeds) and the test image's quality score, "
        "per distortion type over its three levels; ECE/NLL per test set in calibration.csv.", "",
        markdown(tables["calibration"][["strategy", "labels", "train_set", *[f"rho_{d}" for d in DISTORTIONS],
                                        "pristine_ece", "pristine_nll"]]), "",
        f"Targets clipped to iqa.clip on the training set: {clipped}.", "",
        f"### Corruptions never seen in training (CIFAR-10-C style, severities {list(p.corrupt.severities)})", "",
        "Accuracy per family, mean over severities and seeds (unseen.csv).", "",
        markdown(tables["unseen"]), "",
        "![Figure 3](fig3.png)", "", "![Figure 4](fig4.png)", "",
        "![Confidence vs quality](confidence_quality.png)", "", "![Training curves](training.png)", "",
    ])
    md += along_training(metrics, p.train.snapshot_every)
    summary = {"test_images": n_test, "seeds": list(p.train.seeds), "not_evaluated": list(not_evaluated),
               "cells_within": int(dev_summary.iloc[-1].within), "conclusions": conclusions,
               "families": tables["family_counts"].set_index("family").to_dict(orient="index")}
    return {"tables": tables, "texts": {"table2.md": t2_md, "report.md": md}, "summary": summary}


def read_inputs(a: dict[str, Path], p: Params, skip_missing: bool) -> tuple[Params, list[str], dict]:
    """params with the strategies that have results, those without (an error, or with skip_missing, a GPU
    run cut short, left out of every table and named in the report), and everything build() reads."""
    absent = [n for n in p.strategies if not (a["metrics"] / f"{n}.json").is_file()
              or not (a["predictions"] / f"{n}.npz").is_file()]
    if absent and not skip_missing:
        raise DataError(f"{a['metrics']}, {a['predictions']}: nothing for {absent} (run their evaluate stages)")
    if absent:
        log.warning("not evaluated, left out of the report: %s", ", ".join(absent))
        keep = {n: s for n, s in p.strategies.items() if n not in absent}
        report = dataclasses.replace(p.report, fig4_strategies=[n for n in p.report.fig4_strategies if n in keep])
        p = dataclasses.replace(p, strategies=keep, report=report)
    preds = {}
    for n in p.strategies:
        with np.load(a["predictions"] / f"{n}.npz") as z:
            preds[n] = {k: z[k] for k in ("probs", "labels", "seeds")}
    return p, absent, {
        "metrics": {n: read_json(a["metrics"] / f"{n}.json") for n in p.strategies}, "preds": preds,
        "paper_rows": paper_by_name(pd.read_csv(a["paper"] / "paper_table2.csv"), p.report.table2),
        "scores": {s: np.load(a["scores"] / f"{s}.npy") for s in SPLITS},
        "n_train": len(official_index(a["raw"] / "train.npz")), "n_full": SPLITS["train"],
        "clipped": sum(v["clipped"] for v in read_json(a["metrics"] / "score.json")["train"].values())}
