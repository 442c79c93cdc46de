"""Table 2 layout, the comparisons and their statistics, the conclusion lines, regime and figures."""
import dataclasses
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from iqals import claims, figures, mixture, stats
from iqals import report as rep
from iqals.data import CLASSES
from iqals.params import DISTORTIONS, LABEL_RULES, TEST_SETS, Strategy


@pytest.fixture
def paper(repo_root, params):
    return rep.paper_by_name(pd.read_csv(repo_root / "reference" / "paper_table2.csv"), params.report.table2)


def fake_metrics(strategies, acc_of, std=0.01):
    return {n: {"labels": s.labels, "train_set": s.train_set,
                **{t: {"acc": acc_of(n, t), "acc_std": std, "ece": 0.1, "nll": 1.0, "conf": 0.5} for t in TEST_SETS}}
            for n, s in strategies.items()}


def fake_preds(strategies, right_of, n=400, seeds=(0,)):
    """One-hot 'probabilities', right where right_of(name, seed index, test set index) (bool (n,)) says."""
    labels = np.arange(n) % 10
    out = {}
    for name in strategies:
        probs = np.zeros((len(seeds), len(TEST_SETS), n, 10), np.float32)
        for s in range(len(seeds)):
            for j in range(len(TEST_SETS)):
                pred = np.where(right_of(name, s, j), labels, (labels + 1) % 10)
                probs[s, j, np.arange(n), pred] = 1
        out[name] = {"probs": probs, "labels": labels, "seeds": np.array(seeds)}
    return out


def test_table2_layout_and_differences(params, paper):
    t2 = rep.table2(fake_metrics(params.strategies, lambda n, t: 0.5), paper)
    assert list(t2["strategy"]) == list(params.report.table2)  # paper rows only, in order
    assert t2.loc[0, "pristine_paper"] == pytest.approx(0.794)
    assert t2.loc[0, "pristine_diff"] == pytest.approx(0.5 - 0.794)
    md = rep.table2_markdown(t2, n_seeds=1).splitlines()
    assert md[0] == "| S | labels | train set | " + " | ".join(TEST_SETS) + " |"
    assert md[2].startswith("| S1 | original | pristine | 50.0 (79.4, -29.4) | 50.0 (67.6, -17.6) |")
    assert "±1.0" in rep.table2_markdown(t2, n_seeds=3)


def test_claim_sets_are_pristine_and_the_claim_levels_of_the_mix(params):
    assert claims.claim_sets(params.strategies["S3"], (1, 2)) == ["pristine", "blur_1", "blur_2"]
    assert len(claims.claim_sets(params.strategies["S9"], (1, 2))) == 7
    assert claims.twin(params.strategies, "U9") == "S8"
    assert claims.twin(params.strategies, "S5", "uniform_ls") == "U5"


def test_holm_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    np.testing.assert_allclose(stats.holm(p)[:4], [0.04, 0.09, 0.09, 0.2])
    assert np.isnan(stats.holm(p)[4])
    assert stats.holm(np.array([0.6, 0.7]))[1] == 1.0  # capped


def test_cmh_combines_per_seed_mcnemar_tables():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 200)) < 0.6, rng.random((3, 200)) < 0.5
    bk, ck = (a & ~b).sum(1), (~a & b).sum(1)
    assert stats.cmh_mcnemar(a, b) == pytest.approx(scipy_stats.chi2.sf((bk - ck).sum() ** 2 / (bk + ck).sum(), 1))
    one = stats.cmh_mcnemar(a[:1], b[:1])  # one seed: McNemar's exact test
    assert one == pytest.approx(scipy_stats.binomtest(int(bk[0]), int(bk[0] + ck[0]), 0.5).pvalue)
    assert stats.cmh_mcnemar(a, a) == 1.0


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.15, 0.6, 0.25], size=(1, 2000))
    r = stats.bootstrap_test(d, stats.Bootstrap(2000, 1, 4000, seed=2))
    half = 1.96 * d.std() / np.sqrt(d.size)
    assert r["diff"] == pytest.approx(d.mean())
    assert r["ci_hi"] - r["ci_lo"] == pytest.approx(2 * half, rel=0.1)
    assert r["p"] < 0.001  # 0.1 +- 0.014
    assert stats.bootstrap_test(np.zeros((1, 50)), stats.Bootstrap(50, 1, 200, seed=0))["p"] == 1.0


def test_bootstrap_resamples_whole_seeds_and_counts_ties_at_zero_in_both_tails():
    """Seed 0 gains 1 on every image, seed 1 nothing: only drawing seeds moves the mean, to 0 (seed 1 twice),
    1/2 or 1 with chances 1/4, 1/2, 1/4. The interval [0, 1] touches 0, so the replicates at 0 count in p."""
    boot = stats.Bootstrap(100, 2, 4000, seed=0)
    d = np.stack([np.ones(100), np.zeros(100)])
    reps = boot.replicates(d)  # image counts sum to 100: every value exact
    assert set(np.unique(reps)) == {0.0, 0.5, 1.0}
    for end in (0.0, 1.0):  # 5 binomial sd, sqrt(3/16 / 4000) = 0.007
        assert np.mean(reps == end) == pytest.approx(0.25, abs=0.035)
    r = stats.bootstrap_test(d, boot)
    assert (r["diff"], r["ci_lo"], r["ci_hi"]) == (0.5, 0.0, 1.0)
    assert r["p"] == 2 * (np.sum(reps == 0) + 1) / (len(reps) + 1)  # two-sided, one added to each count
    tied = stats.Bootstrap(2, 1, 1000, seed=0)  # d = (+1, -1): half the replicates are 0, so both tails hold 3/4
    assert stats.bootstrap_test(np.array([[1.0, -1.0]]), tied)["p"] == 1.0  # 2 x 3/4 capped at 1
    d = np.random.default_rng(1).choice([-1.0, 0.0, 1.0], size=(2, 100))
    r = stats.bootstrap_test(d, boot)
    assert [r["ci_lo"], r["ci_hi"]] == list(np.quantile(boot.replicates(d), [0.025, 0.975]))  # the central 95%


def test_paired_t_of_per_seed_accuracies_by_hand():
    # differences 2, 3, 1 (/64, exact): t = mean / (sd / sqrt 3) = 2 sqrt 3 on 2 degrees of freedom, where
    # p = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(6/7). Unpaired, the seeds' spread (0.625 to 0.875) would swamp it.
    # A few float64 roundings in t and in the t distribution: far below 1e-12
    a = np.array([0.75, 0.625, 0.875])
    assert stats.paired_t(a, a - np.array([2, 3, 1]) / 64) == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-12)
    # two seeds, differences 1/32 and 1/64: t = 3 on 1 degree of freedom (Cauchy), p = 1 - 2 atan(3) / pi
    assert stats.paired_t(a[:2], a[:2] - [1 / 32, 1 / 64]) == pytest.approx(1 - 2 * math.atan(3) / math.pi, rel=1e-12)
    assert math.isnan(stats.paired_t(a[:1], a[:1] - 0.1))  # one seed
    assert math.isnan(stats.paired_t(a, a - 1 / 64))  # no variation


def test_seeds_that_repeat_the_same_images_are_not_counted_as_new_evidence():
    """Three seeds with identical per-image results carry the evidence of one: same p and interval.
    Pooling (seed, image) pairs as independent would make the p-value far smaller."""
    d1 = np.random.default_rng(3).permutation(np.repeat([1.0, -1.0, 0.0], [220, 180, 600]))[None]  # z about 2
    boot1, boot3 = stats.Bootstrap(1000, 1, 5000, seed=4), stats.Bootstrap(1000, 3, 5000, seed=4)
    one, three = stats.bootstrap_test(d1, boot1), stats.bootstrap_test(np.repeat(d1, 3, 0), boot3)
    assert three["p"] == pytest.approx(one["p"], abs=0.02)
    assert three["ci_hi"] - three["ci_lo"] == pytest.approx(one["ci_hi"] - one["ci_lo"], rel=0.05)
    pooled = stats.cmh_mcnemar(np.repeat(d1 > 0, 3, 0), np.repeat(d1 < 0, 3, 0))
    assert 0.01 < one["p"] < 0.1 and pooled < one["p"] / 10  # what counting each seed's images as new claims


def test_comparisons_cover_every_family_and_holm_runs_within_each(params):
    strategies = params.strategies
    # S3 right on 90%, S2/U3/R3 on 60% of the images; everything else at 60%
    preds = fake_preds(strategies, lambda n, s, j: np.arange(400) % 10 < (9 if n == "S3" else 6), seeds=(0, 1))
    comps = claims.comparisons(strategies, preds, (1, 2), stats.Bootstrap(400, 2, 2000, seed=0), 0.05)
    assert set(comps["family"]) == set(claims.FAMILIES.values())
    assert len(comps) == len(claims.FAMILIES) * 4 * (len(TEST_SETS) + 1)  # 4 mixes, each test set + the claim
    s3 = comps[(comps["a"] == "S3") & (comps["test_set"] == claims.CLAIM)].set_index("b")
    assert set(s3.index) == {"S2", "U3", "R3"}  # IQA-LS against one-hot AND both controls, directly
    assert s3.loc["U3", "diff"] == pytest.approx(0.3) and s3.loc["U3", "p_holm"] < 0.05
    for (family, is_claim), g in comps.groupby(["family", comps["test_set"] == claims.CLAIM]):
        np.testing.assert_allclose(g["p_holm"], stats.holm(g["p"].to_numpy()))
    counts = claims.family_counts(comps).set_index("family")
    assert counts.loc["IQA-LS vs uniform", "cells"] == 4 * len(TEST_SETS)
    assert counts.loc["IQA-LS vs uniform", "a_better"] == len(TEST_SETS)  # only mix_blur differs
    assert counts.loc["uniform vs one-hot", "significant"] == 0
    lines = claims.conclusion_lines(comps, 0.05)
    assert lines[0].startswith("- **mix_blur** (S3): IQA-LS better than one-hot S2 (+30.0 points, 95% CI [")
    assert "better than uniform U3" in lines[0] and "better than shuffled R3" in lines[0]
    assert "indistinguishable from one-hot S4" in lines[1]


def test_comparison_columns_by_hand(params, paper):
    """S3 vs S2 on 2 seeds, images in 40 groups of 10: S3 alone right on 4 groups and S2 alone on 2 (seed 0),
    2 and 1 (seed 1); on blur_3 (not a claim set) S3 is right everywhere."""
    strategies = {k: params.strategies[k] for k in ("S2", "S3")}
    g = np.arange(400) % 40
    right = {("S3", 0): g < 24, ("S2", 0): (g >= 4) & (g < 26), ("S3", 1): g < 22, ("S2", 1): (g >= 2) & (g < 23)}
    preds = fake_preds(strategies, lambda n, s, j: np.ones(400, bool) if (n, j) == ("S3", 3) else right[n, s],
                       seeds=(0, 1))
    comps = claims.comparisons(strategies, preds, (1, 2), stats.Bootstrap(400, 2, 2000, seed=0), 0.05)
    rows = comps.set_index("test_set")
    same = rows.drop(index=["blur_3", claims.CLAIM])
    # discordant pairs 40 - 20 and 20 - 10: CMH chi2 = 30^2 / 90 = 10 on 1 df, p = erfc(sqrt(10 / 2))
    np.testing.assert_allclose(same["p_cmh"], math.erfc(math.sqrt(5)), rtol=1e-12)
    assert math.isnan(rows.loc[claims.CLAIM, "p_cmh"])  # per-image means are not right/wrong pairs
    # per-seed differences 0.05, 0.025: paired t = 3 on 1 df (Cauchy); the claim sets agree, so the claim too
    np.testing.assert_allclose(same["p_t_seeds"], 1 - 2 * math.atan(3) / math.pi, rtol=1e-12)
    assert rows.loc[claims.CLAIM, "p_t_seeds"] == pytest.approx(1 - 2 * math.atan(3) / math.pi, rel=1e-12)
    # the claim is the mean over pristine, blur_1, blur_2 only: blur_3's +46 points stay out (float32 d)
    assert rows.loc[claims.CLAIM, "diff"] == pytest.approx(0.0375, rel=1e-6)
    # a raw p under alpha that Holm lifts over it (blur_3 first, then 9 equal ps: 9 p) is not significant
    assert (same["p"] < 0.05).all() and (same["p_holm"] >= 0.05).all()
    assert comps["significant"].tolist() == (comps["p_holm"] < 0.05).tolist()
    line, = claims.claim_lines(strategies, comps, paper, (1, 2))
    assert line.startswith("- S3 vs S2: pristine +")
    shown = [float(x) for x in re.findall(r"\(paper ([-+][0-9.]+)\)", line)]
    want = [100 * (paper["S3"][t] - paper["S2"][t]) for t in ("pristine", "blur_1", "blur_2")]
    np.testing.assert_allclose(shown, want, atol=0.05 + 1e-9)  # printed to 0.1 point


def test_conclusions_and_counts_follow_holm_and_the_sign():
    def row(b, test_set, diff, p, p_holm):
        fam = {"S2": "IQA-LS vs one-hot", "U3": "IQA-LS vs uniform", "R3": "IQA-LS vs shuffled"}[b]
        return {"family": fam, "train_set": "mix_blur", "a": "S3", "b": b, "test_set": test_set, "diff": diff,
                "ci_lo": diff - 0.01, "ci_hi": diff + 0.01, "p": p, "p_holm": p_holm, "significant": p_holm < 0.05}

    comps = pd.DataFrame([row("S2", "claim", -0.02, 0.001, 0.004), row("U3", "claim", 0.02, 0.01, 0.06),
                          row("R3", "claim", 0.03, 0.001, 0.002), row("S2", "pristine", -0.02, 0.001, 0.003),
                          row("S2", "blur_1", 0.01, 0.001, 0.003), row("S2", "blur_2", 0.01, 0.001, 0.003)])
    assert claims.conclusion_lines(comps, 0.05) == [
        "- **mix_blur** (S3): IQA-LS worse than one-hot S2 (-2.0 points, 95% CI [-3.0, -1.0], Holm p = 0.004); "
        "indistinguishable from uniform U3 (+2.0 points, 95% CI [+1.0, +3.0], Holm p = 0.06); "  # raw p 0.01
        "better than shuffled R3 (+3.0 points, 95% CI [+2.0, +4.0], Holm p = 0.002)."]
    counts = claims.family_counts(comps).set_index("family")
    assert counts.loc["IQA-LS vs one-hot"].to_dict() == {"cells": 3, "significant": 3, "a_better": 2, "a_worse": 1,
                                                         "claim_cells": 1, "claim_significant": 1}
    assert counts.loc["IQA-LS vs uniform", "claim_significant"] == 0


def test_comparisons_refuse_strategies_evaluated_on_other_seeds(params):
    strategies = {k: params.strategies[k] for k in ("S2", "S3")}
    preds = fake_preds(strategies, lambda n, s, j: np.ones(400, bool))
    preds["S3"]["seeds"] = np.array([1])
    with pytest.raises(ValueError, match="different seeds"):
        claims.comparisons(strategies, preds, (1, 2), stats.Bootstrap(400, 1, 100, seed=0), 0.05)


def test_regime_says_when_the_run_cannot_speak_to_the_paper(params):
    text = rep.regime(params, 2000, 50000, 1000, 0.41, 0.794)
    assert "2000 training images" in text and "1000 test images" in text and "1 seed(s) [0]" in text
    assert f"{100 * np.sqrt(0.41 * 0.59 / 1000):.1f} points" in text
    assert "cannot confirm or refute" in text and "one seed" in text and "41.0%" in text
    full = dataclasses.replace(params, train=dataclasses.replace(params.train, seeds=(0, 1, 2)))
    assert "cannot confirm" not in rep.regime(full, 50000, 50000, 1000, 0.79, 0.794)
    assert params.report.s1_tolerance == 0.03
    for s1 in (0.764, 0.824):  # on the bound either side (100 (ours - paper) rounds either way): the regime
        assert "cannot confirm" not in rep.regime(full, 50000, 50000, 1000, s1, 0.794), s1
    text = rep.regime(full, 50000, 50000, 1000, 0.834, 0.794)  # far above the paper is another regime too
    assert "cannot confirm" in text and "S1 reaches 83.4% where the paper reports 79.4%" in text


def test_one_seed_std_is_na_not_zero(params):
    eps = {m: 0.1 for m in claims.mixes(params.strategies)}
    ctrl = rep.controls(params.strategies, fake_metrics(params.strategies, lambda n, t: 0.5, std=None), eps, (1, 2))
    md = rep.markdown(ctrl)
    header, _, *rows = ([c.strip() for c in line.split("|")] for line in md.splitlines())
    assert rows and all(r[header.index("pristine_std")] == "n/a" for r in rows)


def test_controls_rows_and_means_by_hand(params):
    # acc, ece = 0.5 + j/64, j/64 and nll = j on test set j: every mean below is exact in float64
    metrics = {n: {t: {"acc": 0.5 + j / 64, "acc_std": None, "ece": j / 64, "nll": float(j)}
                   for j, t in enumerate(TEST_SETS)} for n in params.strategies}
    ctrl = rep.controls(params.strategies, metrics, {m: 0.1 for m in claims.mixes(params.strategies)}, (1, 2))
    assert len(ctrl) == 16 and "S1" not in set(ctrl.strategy)  # the mixes' strategies only
    for mix, g in ctrl.groupby("train_set", sort=False):  # each mix together, label rules in params order
        assert list(g.index) == list(range(g.index[0], g.index[0] + 4)) and list(g.labels) == list(LABEL_RULES)
    by = ctrl.set_index("strategy")
    assert by.loc["S3", "claim_levels"] == 0.5 + 1.5 / 64  # blur_1, blur_2
    assert by.loc["R9", "claim_levels"] == 0.5 + 4.5 / 64  # levels 1, 2 of all three types
    assert (ctrl.all_distorted == 0.5 + 5 / 64).all() and (ctrl.pristine == 0.5).all()
    assert (ctrl.ece_mean == 4.5 / 64).all() and (ctrl.nll_mean == 4.5).all()  # over all ten test sets


def test_cell_kinds_of_every_table2_cell(params, paper):
    dev = rep.deviations(rep.table2(fake_metrics(params.strategies, lambda n, t: 0.5), paper), 1000, 1, 10000)
    assert dev.kind.value_counts().to_dict() == {"mix, own type": 36, "mix, other type": 36, "pristine-trained": 10,
                                                 "mix, pristine": 8}
    assert [rep.cell_kind("mix_all3", t) for t in TEST_SETS] == ["mix, pristine"] + ["mix, own type"] * 9
    assert [rep.cell_kind("mix_jpeg", t) for t in TEST_SETS[1:]] == ["mix, other type"] * 6 + ["mix, own type"] * 3


def test_deviation_summary_and_grid_by_hand():
    # binary fractions: every mean is exact; a cell on the paper (0) is not above it
    dev = pd.DataFrame({"strategy": ["S1"] * 3 + ["S2"], "train_set": ["pristine"] * 3 + ["mix_blur"],
                        "kind": ["pristine-trained"] * 3 + ["mix, other type"],
                        "diff_points": [0.0, -1.0, 4.0, -2.5], "z": [0.0, -0.5, 2.5, -2.0]})
    got = rep.deviation_summary(dev, 0.02).to_dict(orient="records")
    assert got == [{"kind": "pristine-trained", "cells": 3, "within": 2, "mean_diff_points": 1.0, "mean_abs_z": 1.0,
                    "above_paper": 1},
                   {"kind": "mix, other type", "cells": 1, "within": 0, "mean_diff_points": -2.5, "mean_abs_z": 2.0,
                    "above_paper": 0},
                   {"kind": "all", "cells": 4, "within": 2, "mean_diff_points": 0.125, "mean_abs_z": 1.25,
                    "above_paper": 1}]
    # exactly 2 points either side of the paper, though 100 (ours - paper) rounds to -2.0000000000000018 below
    on_bound = rep.deviations(rep.table2({"S1": {"labels": "one-hot", "train_set": "pristine",
                                                 **{t: {"acc": 0.774 + 0.04 * (j % 2), "acc_std": None}
                                                    for j, t in enumerate(TEST_SETS)}}},
                                         {"S1": pd.Series({t: 0.794 for t in TEST_SETS})}), 10000, 1, 10000)
    assert rep.deviation_summary(on_bound, 0.02).within.tolist() == [10, 10]
    assert rep.deviation_summary(on_bound, 0.0199).within.tolist() == [0, 0]
    assert rep.deviation_grid(dev).splitlines()[2:] == ["| S1 | pristine | +0.0 (+0.0) | -1.0 (-0.5) | +4.0 (+2.5) |",
                                                        "| S2 | mix_blur | -2.5 (-2.0) |"]


def test_mix_epsilon_is_the_uniform_controls_epsilon(params):
    rng = np.random.default_rng(1)
    scores = rng.uniform(0.3, 1.0, size=(3, 3, 50))
    eps = rep.mix_epsilons(params.strategies, scores, params.iqa, params.mixture.shares)
    assert set(eps) == {"mix_blur", "mix_noise", "mix_jpeg", "mix_all3"}
    q = mixture.true_class_probability(Strategy("U", "mix_noise", "uniform_ls"), 50, scores, params.iqa,
                                       params.mixture.shares, 0)
    assert q[0, 0] == pytest.approx(1 - eps["mix_noise"] * 9 / 10)


def test_calibration_spearman_is_per_distortion_type(params):
    strategies = {k: params.strategies[k] for k in ("S1",)}
    scores = np.random.default_rng(0).uniform(0, 1, size=(3, 3, 40))
    probs = np.full((1, len(TEST_SETS), 40, 10), 0.0, np.float32)
    labels = np.zeros(40, dtype=int)
    probs[0, 1:, :, 0] = scores.reshape(9, 40)  # confidence = quality on blur ...
    probs[0, 4:7, :, 0] = 1 - scores[1]          # ... reversed on noise
    cal = rep.calibration(fake_metrics(strategies, lambda n, t: 0.5), {"S1": {"probs": probs, "labels": labels}},
                          scores)
    assert cal.loc[0, "rho_blur"] == pytest.approx(1) and cal.loc[0, "rho_noise"] == pytest.approx(-1)


def test_calibration_rho_is_spearmans_of_the_seed_mean_confidence(params):
    rng = np.random.default_rng(2)
    n, scores, labels = 30, rng.uniform(0, 1, size=(3, 3, 30)), rng.integers(0, 10, 30)
    conf = rng.uniform(0, 1, size=(2, len(TEST_SETS), n)).astype(np.float32)  # two seeds that disagree
    probs = np.zeros((2, len(TEST_SETS), n, 10), np.float32)
    probs[:, :, np.arange(n), labels] = conf
    cal = rep.calibration(fake_metrics({"S1": params.strategies["S1"]}, lambda n, t: 0.5),
                          {"S1": {"probs": probs, "labels": labels}}, scores)
    mean = conf.astype(np.float64).mean(0)[1:].reshape(3, -1)  # per type: its 3 levels x n images
    for t, d in enumerate(DISTORTIONS):  # Pearson of the ranks; 90 values, float64: within 1e-12
        want = np.corrcoef(scipy_stats.rankdata(mean[t]), scipy_stats.rankdata(scores[t].ravel()))[0, 1]
        assert cal.loc[0, f"rho_{d}"] == pytest.approx(want, abs=1e-12)


def test_markdown():
    df = pd.DataFrame({"a": ["x", "y"], "b": [0.12345, float("nan")]})
    assert rep.markdown(df) == "| a | b |\n|---|---|\n| x | 0.123 |\n| y | n/a |\n"


def test_fig3_draws_the_papers_values_beside_ours(params, paper):
    """Each panel: pristine then levels 1-3 of its type (all3: of each type in turn), ours with the std over seeds
    as error bars, the paper's row faint in the same colour, S1 dotted; every cell its own value, so a mix-up shows."""
    metrics = fake_metrics(params.strategies, lambda n, t: 0.5 + int(n[1:]) / 100 + TEST_SETS.index(t) / 1000)
    for n, m in metrics.items():
        for t in TEST_SETS:
            m[t]["acc_std"] = 0.001 + TEST_SETS.index(t) / 10000
    fig = figures.fig3(metrics, paper, params.report.fig3_panels, 3)
    for ax, (panel, names) in zip(fig.axes, params.report.fig3_panels.items()):
        curves = [(n, panel) for n in names] if panel in DISTORTIONS else [(n, k) for n in names for k in DISTORTIONS]
        faint = [ln for ln in ax.lines if ln.get_alpha() == figures.PAPER_STYLE["alpha"] and len(ln.get_xdata())]
        assert len(ax.containers) == len(faint) == len(curves), panel
        for (name, kind), bars, theirs in zip(curves, ax.containers, faint):
            sets = ["pristine", f"{kind}_1", f"{kind}_2", f"{kind}_3"]
            ours = bars.lines[0]
            np.testing.assert_array_equal(ours.get_xdata(), [0, 1, 2, 3])
            want = [metrics[name][t]["acc"] for t in sets]
            np.testing.assert_allclose(ours.get_ydata(orig=False), want, err_msg=name)
            ends = np.array(bars.lines[2][0].get_segments())[:, :, 1]  # (points, [y - err, y + err])
            np.testing.assert_allclose((ends[:, 1] - ends[:, 0]) / 2, [metrics[name][t]["acc_std"] for t in sets],
                                       atol=1e-12, err_msg=name)
            np.testing.assert_allclose(theirs.get_ydata(), [paper[name][t] for t in sets], err_msg=name)
            assert theirs.get_color() == ours.get_color(), name
            if panel in DISTORTIONS:
                assert ours.get_linestyle() == (":" if name == "S1" else "-"), name
            if (panel, name) == ("blur", "S1"):
                np.testing.assert_allclose(theirs.get_ydata(), [0.794, 0.676, 0.524, 0.436])  # the paper's table
    blur = {"blur": params.report.fig3_panels["blur"]}  # S1, S2, S3
    assert not figures.fig3(metrics, paper, blur, 1).axes[0].containers[0].has_yerr  # one seed: no spread
    # a strategy left out of the run is left out of its panel
    ax = figures.fig3({n: m for n, m in metrics.items() if n != "S2"}, paper, blur, 3).axes[0]
    assert len(ax.containers) == 2 and ax.get_title() == "blur: S1, S3"
    # all3 with more strategies than line styles: every strategy drawn, each in a look of its own
    five = ["S2", "S3", "S4", "S8", "S9"]
    ax = figures.fig3(metrics, paper, {"all3": five}, 3).axes[0]
    looks = [(bars.lines[0].get_linestyle(), bars.lines[0].get_marker()) for bars in ax.containers]
    assert [bars.get_label() for bars in ax.containers] == [f"{n} {k}" for n in five for k in DISTORTIONS]
    assert len(set(looks)) == len(five) and all(len(set(looks[i:i + 3])) == 1 for i in range(0, 15, 3))


def test_fig4_shows_each_example_at_each_blur_level_with_the_seed_mean_confidence():
    """Row per example, column per level (pristine, blur 1-3): the image shown and each strategy's true-class
    probability on that test set, mean over seeds (seeds apart, so a single seed's shows)."""
    rng = np.random.default_rng(4)
    n = 6
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    blurred = rng.integers(0, 256, size=(3, n, 32, 32, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9])
    probs = {s: rng.uniform(0, 1, size=(2, len(TEST_SETS), n, 10)).astype(np.float32) for s in ("S1", "S3")}
    examples = [4, 1]
    fig = figures.fig4(images, blurred, labels, examples, probs, CLASSES)
    axes = np.array(fig.axes).reshape(len(examples), 4)
    for r, i in enumerate(examples):
        assert axes[r, 0].get_ylabel() == f"#{i} {CLASSES[labels[i]]}"
        for c in range(4):  # test set c: pristine, then blur_1..blur_3 (Table 2's order)
            shown = images[i] if c == 0 else blurred[c - 1, i]
            np.testing.assert_array_equal(axes[r, c].images[0].get_array(), shown)
            means = {s: (float(p[0, c, i, labels[i]]) + float(p[1, c, i, labels[i]])) / 2 for s, p in probs.items()}
            assert all(abs(v * 1000 % 1 - 0.5) > 1e-3 for v in means.values())  # the premise: off a rounding tie
            want = ", ".join(f"{s} {v:.3f}" for s, v in means.items())
            assert axes[r, c].get_xlabel() == want, (r, c)
    assert [ax.get_title() for ax in axes[0]] == ["pristine", "blur level 1", "blur level 2", "blur level 3"]


def test_confidence_quality_bins_follow_the_score(params):
    scores = np.random.default_rng(0).uniform(0.2, 1, size=(3, 3, 300))
    conf = {"S1": scores, "S2": 1 - scores}
    fig = figures.confidence_quality(conf, params.strategies, scores, 5)
    s1, s2 = fig.axes[0].lines[:2]
    assert np.all(np.diff(s1.get_ydata()) > 0) and np.all(np.diff(s2.get_ydata()) < 0)
    np.testing.assert_allclose(s1.get_xdata(), s1.get_ydata())  # bin mean of score = of confidence
    assert [ln.get_label() for ln in fig.axes[1].lines] == ["S1"]  # S2 (mix_blur) not on the noise panel


def test_confidence_quality_by_hand(params):
    """Type t's scores are 10 t + 0..8 over its 3 levels x 3 images: 4 quantile bins have edges 10 t + 0, 2, 4, 6,
    8, a score on an edge in the bin above it (the last closed): {0, 1}, {2, 3}, {4, 5}, {6, 7, 8}."""
    order = np.random.default_rng(1).permutation(9)
    scores = np.stack([10.0 * t + order.reshape(3, 3) for t in range(3)])
    conf = {"S1": (scores % 10) ** 2 / 64 + np.arange(3)[:, None, None] / 10}  # (types, levels, N)
    fig = figures.confidence_quality(conf, {"S1": params.strategies["S1"]}, scores, 4)  # S1: pristine, every panel
    groups = [[0, 1], [2, 3], [4, 5], [6, 7, 8]]
    for t, ax in enumerate(fig.axes):
        (line,) = ax.lines
        np.testing.assert_allclose(line.get_xdata(), [10 * t + np.mean(g) for g in groups], err_msg=DISTORTIONS[t])
        np.testing.assert_allclose(line.get_ydata(), [np.mean([v * v / 64 + t / 10 for v in g]) for g in groups],
                                   err_msg=DISTORTIONS[t])


def test_training_curves_average_over_seeds():
    logs = {"S1": pd.DataFrame({"epoch": [1, 2, 1, 2], "loss": [1.0, 0.5, 3.0, 1.5],
                                "train_acc": [0.1, 0.2, 0.3, 0.4]})}
    fig = figures.training_curves(logs)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [2.0, 1.0])
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [0.2, 0.3])


def test_probe_curves_draw_each_test_set_beside_the_papers_s1():
    """A panel per distortion type: training and pristine accuracy, that type's three levels, and the paper's S1
    on each as a horizontal line in the level's colour (pristine's in black)."""
    sets = list(TEST_SETS)
    rows = pd.DataFrame({"epoch": [10, 20, 30], "train_acc": [0.3, 0.6, 0.9],
                         **{t: [0.1 + j / 100, 0.2 + j / 100, 0.25 + j / 100] for j, t in enumerate(sets)}})
    paper_s1 = pd.Series({t: 0.8 - j / 50 for j, t in enumerate(sets)})
    fig = figures.probe_curves(rows, paper_s1)
    for ax, kind in zip(fig.axes, DISTORTIONS):
        drawn = [ln for ln in ax.lines if len(ln.get_xdata()) == 3 and ln.get_alpha() is None]
        flat = {ln.get_color(): ln.get_ydata() for ln in ax.lines if ln.get_alpha() == figures.PAPER_STYLE["alpha"]}
        levels = [f"{kind}_{k}" for k in (1, 2, 3)]
        assert [ln.get_label() for ln in drawn] == ["train (eval mode)", "pristine", *levels]
        for ln, col in zip(drawn, ["train_acc", "pristine", *levels]):
            np.testing.assert_array_equal(ln.get_xdata(), [10, 20, 30])
            np.testing.assert_allclose(ln.get_ydata(), rows[col], err_msg=col)
            if col != "train_acc":
                np.testing.assert_allclose(flat[ln.get_color()], [paper_s1[col]] * 2, err_msg=col)


def test_accuracy_along_training_is_a_section_only_when_runs_kept_snapshots():
    rows = [{"epoch": e, **{t: a for t in TEST_SETS}} for e, a in ((50, 0.5), (100, 0.625))]
    metrics = {"S1": {"along_training": {"seed0": rows}}, "S2": {}}
    text = rep.along_training(metrics, 50)
    assert text.startswith("### Along training") and "every 50 epochs" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(["strategy", "seed", "epoch", *TEST_SETS]) + " |"
    assert table[1:] == ["| S1 | seed0 | 50 | " + " | ".join(["0.500"] * 10) + " |",
                         "| S1 | seed0 | 100 | " + " | ".join(["0.625"] * 10) + " |"]
    assert rep.along_training({"S1": {}, "S2": {"along_training": {"seed0": []}}}, 50) == ""
