"""Table 2, the comparisons behind the claims, controls, calibration, and the report's text.

Pure functions over the evaluate stage's metrics and predictions; stages/report.py does I/O.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from . import stats
from .params import DISTORTIONS, LEVELS, TEST_SETS, Params, Strategy, test_set_name
from .seeds import derive_seed

# Families of comparisons (label rule a vs b) and the question each answers; Holm corrects within each.
FAMILIES = {
    ("iqa_ls", "original"): "IQA-LS vs one-hot",       # the paper's claim
    ("uniform_ls", "original"): "uniform vs one-hot",  # does any smoothing of that amount help?
    ("shuffled_ls", "original"): "shuffled vs one-hot",
    ("iqa_ls", "uniform_ls"): "IQA-LS vs uniform",     # is it the amount of smoothing?
    ("iqa_ls", "shuffled_ls"): "IQA-LS vs shuffled",   # is it which image gets which score?
}
CLAIM = "claim"  # the pseudo test set: per-image mean over the claim sets


def _fmt(v, digits: int) -> str:
    if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)


def markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub markdown table (numbers rounded to `digits`, missing as n/a)."""
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v, digits) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def find(strategies: dict[str, Strategy], train_set: str, labels: str) -> str | None:
    """The strategy with this training set and label rule (mix_blur, original -> S2)."""
    return next((s.name for s in strategies.values() if s.train_set == train_set and s.labels == labels), None)


def twin(strategies: dict[str, Strategy], name: str, labels: str = "original") -> str | None:
    """The strategy with the same training set and label rule `labels` (S3 -> S2)."""
    return find(strategies, strategies[name].train_set, labels)


def mixes(strategies: dict[str, Strategy]) -> list[str]:
    """The training mixes with distorted copies, in params order."""
    return list(dict.fromkeys(s.train_set for s in strategies.values() if s.distortions))


def claim_sets(strategy: Strategy, levels) -> list[str]:
    """Pristine plus the mix's own distortions at the claim levels (the paper claims levels 1-2)."""
    return ["pristine"] + [test_set_name(DISTORTIONS.index(d), lv - 1) for d in strategy.distortions for lv in levels]


def paper_by_name(paper: pd.DataFrame, names) -> dict[str, pd.Series]:
    """The paper's Table 2 rows keyed by our strategy names (report.table2 lists them in its order)."""
    return {n: paper.iloc[i] for i, n in enumerate(names)}


# ------------------------------------------------------------------ Table 2

def table2(metrics: dict[str, dict], paper_rows: dict[str, pd.Series]) -> pd.DataFrame:
    """Our accuracy beside the paper's, per strategy and test set (Table 2 layout)."""
    rows = []
    for name, ref in paper_rows.items():
        if name not in metrics:
            continue
        m = metrics[name]
        row = {"strategy": name, "regularization": m["labels"], "train_set": m["train_set"]}
        for t in TEST_SETS:
            row[t], row[f"{t}_std"] = m[t]["acc"], m[t]["acc_std"]
            row[f"{t}_paper"] = float(ref[t])
            row[f"{t}_diff"] = m[t]["acc"] - float(ref[t])
        rows.append(row)
    return pd.DataFrame(rows)


def table2_markdown(t2: pd.DataFrame, n_seeds: int) -> str:
    """Cells read 'ours (paper, difference)' in percent; ± std over seeds when there are several."""
    lines = ["| S | labels | train set | " + " | ".join(TEST_SETS) + " |", "|" + "---|" * (3 + len(TEST_SETS))]
    for _, r in t2.iterrows():
        cells = [f"{100 * r[t]:.1f}" + (f"±{100 * r[f'{t}_std']:.1f}" if n_seeds > 1 else "")
                 + f" ({100 * r[f'{t}_paper']:.1f}, {100 * r[f'{t}_diff']:+.1f})" for t in TEST_SETS]
        lines.append(f"| {r['strategy']} | {r['regularization']} | {r['train_set']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ comparisons

def correct(pred: dict) -> np.ndarray:
    """bool (seeds, test sets, N): was each prediction right?"""
    return pred["probs"].argmax(-1) == pred["labels"]


def compare(ca: np.ndarray, cb: np.ndarray, boot: stats.Bootstrap) -> dict:
    """All tests of a vs b on one test set; ca, cb bool (seeds, N), or float for the claim mean."""
    d = ca.astype(np.float32) - cb.astype(np.float32)
    row = stats.bootstrap_test(d, boot)
    row["p_cmh"] = stats.cmh_mcnemar(ca, cb) if ca.dtype == bool else float("nan")
    row["p_t_seeds"] = stats.paired_t(ca.mean(1), cb.mean(1))
    return row


def comparisons(strategies: dict[str, Strategy], preds: dict[str, dict], claim_levels, boot: stats.Bootstrap,
                alpha: float) -> pd.DataFrame:
    """Every family's comparison per mix, on each test set and on the claim (mean over claim sets).

    Holm's correction runs within each family, separately over its per-test-set cells and over its
    claim cells (one per mix).
    """
    rows = []
    for (rule_a, rule_b), family in FAMILIES.items():
        for mix in mixes(strategies):
            a, b = find(strategies, mix, rule_a), find(strategies, mix, rule_b)
            if a is None or b is None or a not in preds or b not in preds:
                continue
            if not np.array_equal(preds[a]["seeds"], preds[b]["seeds"]):
                raise ValueError(f"{a} and {b} were evaluated on different seeds: "
                                 f"{list(preds[a]['seeds'])} vs {list(preds[b]['seeds'])}")
            ca, cb = correct(preds[a]), correct(preds[b])
            base = {"family": family, "train_set": mix, "a": a, "b": b}
            for j, t in enumerate(TEST_SETS):
                rows.append({**base, "test_set": t, **compare(ca[:, j], cb[:, j], boot)})
            idx = [TEST_SETS.index(t) for t in claim_sets(strategies[a], claim_levels)]
            rows.append({**base, "test_set": CLAIM, **compare(ca[:, idx].mean(1), cb[:, idx].mean(1), boot)})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["p_holm"] = np.nan
    for _, g in df.groupby(["family", df["test_set"] == CLAIM]):
        df.loc[g.index, "p_holm"] = stats.holm(g["p"].to_numpy())
    df["significant"] = df["p_holm"] < alpha
    return df


def verdict(row, alpha: float) -> str:
    if row["p_holm"] >= alpha:
        return "indistinguishable from"
    return "better than" if row["diff"] > 0 else "worse than"


def _effect(row) -> str:
    return (f"{100 * row['diff']:+.1f} points, 95% CI [{100 * row['ci_lo']:+.1f}, {100 * row['ci_hi']:+.1f}], "
            f"Holm p = {row['p_holm']:.3g}")


def conclusion_lines(comps: pd.DataFrame, alpha: float) -> list[str]:
    """One line per mix from its claim cells: IQA-LS against one-hot, then against the two controls."""
    lines = []
    claims = comps[comps["test_set"] == CLAIM].set_index(["family", "train_set"])
    for mix in dict.fromkeys(claims.index.get_level_values("train_set")):
        parts = []
        for family, what in (("IQA-LS vs one-hot", "one-hot"), ("IQA-LS vs uniform", "uniform"),
                             ("IQA-LS vs shuffled", "shuffled")):
            if (family, mix) in claims.index:
                r = claims.loc[(family, mix)]
                parts.append(f"{verdict(r, alpha)} {what} {r['b']} ({_effect(r)})")
        if parts:
            a = claims.xs(mix, level="train_set")["a"].iloc[0]
            lines.append(f"- **{mix}** ({a}): IQA-LS " + "; ".join(parts) + ".")
    return lines


def claim_lines(strategies, comps: pd.DataFrame, paper_rows: dict[str, pd.Series], claim_levels) -> list[str]:
    """Per IQA-LS strategy of Table 2: its difference from the one-hot twin on each claim set, with
    the 95% interval, beside the paper's difference."""
    lines = []
    rows = comps[comps["family"] == "IQA-LS vs one-hot"].set_index(["a", "test_set"])
    for name in paper_rows:
        base = twin(strategies, name) if name in strategies else None
        if strategies.get(name) is None or strategies[name].labels != "iqa_ls" or (name, CLAIM) not in rows.index:
            continue
        parts = []
        for t in claim_sets(strategies[name], claim_levels):
            r = rows.loc[(name, t)]
            dp = float(paper_rows[name][t]) - float(paper_rows[base][t]) if base in paper_rows else float("nan")
            parts.append(f"{t} {100 * r['diff']:+.1f} [{100 * r['ci_lo']:+.1f}, {100 * r['ci_hi']:+.1f}]"
                         f" (paper {100 * dp:+.1f})")
        lines.append(f"- {name} vs {base}: " + "; ".join(parts))
    return lines


def family_counts(comps: pd.DataFrame) -> pd.DataFrame:
    """Per family: cells tested and significant after Holm, per test set and on the claims."""
    rows = []
    for family in FAMILIES.values():
        g = comps[comps["family"] == family]
        if g.empty:
            continue
        per, claim = g[g["test_set"] != CLAIM], g[g["test_set"] == CLAIM]
        rows.append({"family": family, "cells": len(per), "significant": int(per["significant"].sum()),
                     "a_better": int((per["significant"] & (per["diff"] > 0)).sum()),
                     "a_worse": int((per["significant"] & (per["diff"] < 0)).sum()),
                     "claim_cells": len(claim), "claim_significant": int(claim["significant"].sum())})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ controls, calibration, unseen

def mix_epsilons(strategies: dict[str, Strategy], scores: np.ndarray, cfg, shares) -> dict[str, float]:
    """Per training mix, the mean per-sample IQA-LS epsilon K(1 - T(s))/(K - 1) over an epoch:
    the epsilon the uniform_ls control smooths every image with."""
    from .mixture import mean_epsilon, true_class_probability

    out = {}
    for mix in mixes(strategies):
        probe = Strategy(name="probe", train_set=mix, labels="iqa_ls")
        out[mix] = mean_epsilon(true_class_probability(probe, scores.shape[-1], scores, cfg, shares, 0), probe, shares)
    return out


def controls(strategies: dict[str, Strategy], metrics: dict, epsilons: dict[str, float], claim_levels) -> pd.DataFrame:
    """Per mix: accuracy of each label rule on pristine and over the claim sets' distorted levels,
    beside the mix's mean IQA-LS epsilon (= the uniform_ls control's epsilon)."""
    rows = []
    order = {r: i for i, r in enumerate(("original", "iqa_ls", "uniform_ls", "shuffled_ls"))}
    for name, s in sorted(strategies.items(), key=lambda kv: (kv[1].train_set, order[kv[1].labels])):
        if name not in metrics or not s.distortions:
            continue
        m = metrics[name]
        rows.append({"train_set": s.train_set, "epsilon": epsilons[s.train_set], "labels": s.labels,
                     "strategy": name, "pristine": m["pristine"]["acc"], "pristine_std": m["pristine"]["acc_std"],
                     "claim_levels": float(np.mean([m[t]["acc"] for t in claim_sets(s, claim_levels)[1:]])),
                     "all_distorted": float(np.mean([m[t]["acc"] for t in TEST_SETS[1:]])),
                     "ece_mean": float(np.mean([m[t]["ece"] for t in TEST_SETS])),
                     "nll_mean": float(np.mean([m[t]["nll"] for t in TEST_SETS]))})
    return pd.DataFrame(rows)


def true_confidence(pred: dict) -> np.ndarray:
    """float (seeds, test sets, N): the softmax probability of the true class."""
    return np.take_along_axis(pred["probs"], pred["labels"][None, None, :, None], -1)[..., 0].astype(np.float64)


def calibration(metrics: dict, preds: dict, test_scores: np.ndarray) -> pd.DataFrame:
    """ECE and NLL per strategy and test set, and per distortion type Spearman's rho between the
    true-class confidence (mean over seeds) and the test image's quality score over that type's
    levels: the paper's claim that confidence follows quality, measured. Per type, because the
    score scales of the types differ."""
    rows = []
    for name, m in metrics.items():
        conf = true_confidence(preds[name]).mean(0)[1:].reshape(len(DISTORTIONS), LEVELS, -1)
        row = {"strategy": name, "labels": m["labels"], "train_set": m["train_set"]}
        for t, d in enumerate(DISTORTIONS):
            row[f"rho_{d}"] = scipy_stats.spearmanr(conf[t].ravel(), test_scores[t].ravel()).statistic
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


# ------------------------------------------------------------------ the report's text

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
    reasons = []
    if len(seeds) == 1:
        reasons.append("it has one seed, so the variance between training runs is unknown")
    if n_train < n_full:
        reasons.append(f"it trains on {n_train} of the {n_full} training images")
    if s1_acc is not None and s1_paper is not None and s1_paper - s1_acc > p.report.s1_tolerance:
        reasons.append(f"S1 reaches {100 * s1_acc:.1f}% where the paper reports {100 * s1_paper:.1f}%: "
                       "the network is not in the paper's regime")
    if reasons:
        text += " **This run cannot confirm or refute the paper:** " + "; ".join(reasons) + "."
    return text


def report_markdown(p: Params, *, regime_text: str, t2_md: str, claims: list[str], conclusions: list[str],
                    counts: pd.DataFrame, ctrl: pd.DataFrame, calib: pd.DataFrame, unseen_df: pd.DataFrame,
                    clipped: int, n_boot: int) -> str:
    levels = ", ".join(str(lv) for lv in p.report.claim_levels)
    seeds_note = ("images and seeds" if len(p.train.seeds) > 1 else
                  "images only (one seed: training-run variance is not included)")
    md = [
        "### Table 2, regenerated", "", regime_text, "",
        "Each cell: our top-1 accuracy in %" + (" ± std over seeds" if len(p.train.seeds) > 1 else "")
        + " (the paper's, our difference).", "", t2_md,
        f"### Does IQA-LS beat its one-hot twin? Judged on pristine and levels {levels} of the mix's own "
        "distortions (the paper's claim); level 3 stays in the tables", "",
        f"Differences in points with 95% intervals from a bootstrap over {seeds_note} ({n_boot} replicates), "
        "beside the paper's difference:", "", *claims, "",
        "### Conclusions per mix", "",
        f"Computed on the claim sets (per-image mean over pristine and levels {levels}): better / worse when the "
        f"Holm-corrected p < {p.report.alpha:g}, else indistinguishable.", "", *conclusions, "",
        "### Controls: is it the quality signal or just smoothing?", "",
        "uniform_ls asks *is it the amount of smoothing?* (every image smoothed with the mix's mean IQA-LS "
        "epsilon); shuffled_ls asks *is it which image gets which score?* (IQA-LS targets permuted within "
        "each level, so each epoch smooths exactly as much). Accuracy on pristine and over the claim sets' "
        "distorted levels; ECE and NLL averaged over the ten test sets.", "",
        markdown(ctrl), "",
        f"Tests per family (Holm within each family; primary test: bootstrap over {seeds_note}; beside it in "
        "plots/comparisons.csv: per-seed McNemar combined over seeds by Cochran-Mantel-Haenszel, and a paired "
        "t-test of per-seed accuracies when there are two or more seeds):", "",
        markdown(counts), "",
        "### Calibration and confidence vs quality", "",
        "Spearman's rho between the true-class confidence (mean over seeds) and the test image's quality score, "
        "per distortion type over its three levels; ECE/NLL per test set in plots/calibration.csv.", "",
        markdown(calib[["strategy", "labels", "train_set", *[f"rho_{d}" for d in DISTORTIONS],
                        "pristine_ece", "pristine_nll"]]), "",
        f"Targets clipped to iqa.clip on the training set: {clipped}.", "",
        f"### Corruptions never seen in training (CIFAR-10-C style, severities {list(p.corrupt.severities)})", "",
        "Accuracy per family, mean over severities and seeds (plots/unseen.csv).", "",
        markdown(unseen_df), "",
        "![Figure 3](plots/fig3.png)", "", "![Figure 4](plots/fig4.png)", "",
        "![Confidence vs quality](plots/confidence_quality.png)", "", "![Training curves](plots/training.png)", "",
    ]
    return "\n".join(md)


def build(p: Params, metrics: dict, preds: dict, paper_rows: dict, scores: dict, n_train: int, n_full: int,
          clipped: int) -> dict:
    """Every table, the report's markdown and the summary, from the evaluate stage's outputs."""
    r, n_seeds, n_test = p.report, len(p.train.seeds), len(next(iter(preds.values()))["labels"])
    boot = stats.Bootstrap(n_test, n_seeds, r.bootstrap, derive_seed(p.base.seed, "report bootstrap"))
    comps = comparisons(p.strategies, preds, r.claim_levels, boot, r.alpha)
    tables = {"table2": table2(metrics, paper_rows), "comparisons": comps, "family_counts": family_counts(comps),
              "controls": controls(p.strategies, metrics, mix_epsilons(p.strategies, scores["train"], p.iqa,
                                                                      p.mixture.shares), r.claim_levels),
              "calibration": calibration(metrics, preds, scores["test"]),
              "unseen": unseen(p.strategies, metrics, p.corrupt.families)}
    s1 = next((n for n in r.table2 if n in metrics), None)
    regime_text = regime(p, n_train, n_full, n_test, metrics[s1]["pristine"]["acc"] if s1 else None,
                         float(paper_rows[s1]["pristine"]) if s1 else None)
    t2_md, conclusions = table2_markdown(tables["table2"], n_seeds), conclusion_lines(comps, r.alpha)
    md = report_markdown(p, regime_text=regime_text, t2_md=t2_md, conclusions=conclusions,
                         claims=claim_lines(p.strategies, comps, paper_rows, r.claim_levels),
                         counts=tables["family_counts"], ctrl=tables["controls"], calib=tables["calibration"],
                         unseen_df=tables["unseen"], clipped=clipped, n_boot=r.bootstrap)
    summary = {"test_images": n_test, "seeds": list(p.train.seeds), "conclusions": conclusions,
               "families": tables["family_counts"].set_index("family").to_dict(orient="index")}
    return {"tables": tables, "table2_md": t2_md, "report_md": md, "summary": summary}
