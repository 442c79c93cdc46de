"""Which strategy beats which: IQA-LS against one-hot and against its two controls, per mix. Each family
(FAMILIES) pairs two label rules within every training mix, on each test set and on the claim (the per-image
mean over pristine and the claim levels of the mix's own distortions), with iqals/stats.py's tests."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import stats
from .params import DISTORTIONS, TEST_SETS, Strategy, test_set_name

# Families of comparisons (label rule a vs b) and the question each answers; Holm corrects within each.
FAMILIES = {
    ("iqa_ls", "original"): "IQA-LS vs one-hot",       # the paper's claim
    ("uniform_ls", "original"): "uniform vs one-hot",  # does any smoothing of that amount help?
    ("shuffled_ls", "original"): "shuffled vs one-hot",
    ("iqa_ls", "uniform_ls"): "IQA-LS vs uniform",     # is it the amount of smoothing?
    ("iqa_ls", "shuffled_ls"): "IQA-LS vs shuffled",   # is it which image gets which score?
}
CLAIM = "claim"  # the pseudo test set: per-image mean over the claim sets
COLUMNS = ["family", "train_set", "a", "b", "test_set", "diff", "ci_lo", "ci_hi", "p", "p_cmh", "p_t_seeds",
           "p_holm", "significant"]  # of comparisons()


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


def comparisons(strategies: dict[str, Strategy], preds: dict[str, dict], claim_levels, boot: stats.Bootstrap,
                alpha: float) -> pd.DataFrame:
    """Every family's comparison per mix, on each test set and on the claim (mean over claim sets).
    Holm runs within each family, separately over its per-test-set cells and over its claim cells."""
    rows, right = [], {n: pr["probs"].argmax(-1) == pr["labels"] for n, pr in preds.items()}  # (seeds, sets, N)
    for (rule_a, rule_b), family in FAMILIES.items():
        for mix in mixes(strategies):
            a, b = find(strategies, mix, rule_a), find(strategies, mix, rule_b)
            if a not in preds or b not in preds:  # None (no such strategy) or not evaluated
                continue
            if not np.array_equal(preds[a]["seeds"], preds[b]["seeds"]):
                raise ValueError(f"{a} and {b} were evaluated on different seeds: "
                                 f"{list(preds[a]['seeds'])} vs {list(preds[b]['seeds'])}")
            ca, cb = right[a], right[b]
            idx = [TEST_SETS.index(t) for t in claim_sets(strategies[a], claim_levels)]
            sets = {t: (ca[:, j], cb[:, j]) for j, t in enumerate(TEST_SETS)}  # bool (seeds, N)
            sets[CLAIM] = ca[:, idx].mean(1), cb[:, idx].mean(1)  # float: the per-image mean over the claim sets
            for t, (xa, xb) in sets.items():
                rows.append({"family": family, "train_set": mix, "a": a, "b": b, "test_set": t,
                             **stats.bootstrap_test(xa.astype(np.float32) - xb.astype(np.float32), boot),
                             "p_cmh": stats.cmh_mcnemar(xa, xb) if xa.dtype == bool else float("nan"),
                             "p_t_seeds": stats.paired_t(xa.mean(1), xb.mean(1))})
    df = pd.DataFrame(rows, columns=COLUMNS[:-2])  # the columns all the same with nothing to compare (a run cut short)
    df["p_holm"] = np.nan
    for _, g in df.groupby(["family", df["test_set"] == CLAIM]):
        df.loc[g.index, "p_holm"] = stats.holm(g["p"].to_numpy())
    df["significant"] = df["p_holm"] < alpha
    return df


def _ci(r) -> str:
    return f"[{100 * r['ci_lo']:+.1f}, {100 * r['ci_hi']:+.1f}]"


def conclusion_lines(comps: pd.DataFrame, alpha: float) -> list[str]:
    """One line per mix from its claim cells: IQA-LS against one-hot, then against the two controls."""
    lines, claims = [], comps[comps["test_set"] == CLAIM].set_index(["family", "train_set"])
    for mix in dict.fromkeys(claims.index.get_level_values("train_set")):
        parts = []
        for (rule_a, _), family in FAMILIES.items():
            if rule_a != "iqa_ls" or (family, mix) not in claims.index:
                continue
            r = claims.loc[(family, mix)]
            verdict = ("indistinguishable from" if r["p_holm"] >= alpha
                       else "better than" if r["diff"] > 0 else "worse than")
            parts.append(f"{verdict} {family.removeprefix('IQA-LS vs ')} {r['b']} ({100 * r['diff']:+.1f} points, "
                         f"95% CI {_ci(r)}, Holm p = {r['p_holm']:.3g})")
        if parts:
            a = claims.xs(mix, level="train_set")["a"].iloc[0]
            lines.append(f"- **{mix}** ({a}): IQA-LS " + "; ".join(parts) + ".")
    return lines


def claim_lines(strategies, comps: pd.DataFrame, paper_rows: dict[str, pd.Series], claim_levels) -> list[str]:
    """Per IQA-LS strategy of Table 2: its difference from the one-hot twin on each claim set, with
    the 95% interval, beside the paper's difference."""
    lines = []
    rows = comps[comps["family"] == FAMILIES[("iqa_ls", "original")]].set_index(["a", "test_set"])
    for name in paper_rows:
        if strategies.get(name) is None or strategies[name].labels != "iqa_ls" or (name, CLAIM) not in rows.index:
            continue
        base = twin(strategies, name)
        parts = []
        for t in claim_sets(strategies[name], claim_levels):
            r = rows.loc[(name, t)]
            dp = float(paper_rows[name][t]) - float(paper_rows[base][t]) if base in paper_rows else float("nan")
            parts.append(f"{t} {100 * r['diff']:+.1f} {_ci(r)} (paper {100 * dp:+.1f})")
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
    return pd.DataFrame(rows, columns=["family", "cells", "significant", "a_better", "a_worse", "claim_cells",
                                       "claim_significant"])
