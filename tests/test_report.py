"""Table 2 layout, the comparisons and their statistics, the conclusion lines, regime and figures."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from iqals import claims, figures, mixture, stats
from iqals import report as rep
from iqals.params import TEST_SETS, Strategy


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


def test_one_seed_std_is_na_not_zero(params):
    eps = {m: 0.1 for m in claims.mixes(params.strategies)}
    ctrl = rep.controls(params.strategies, fake_metrics(params.strategies, lambda n, t: 0.5, std=None), eps, (1, 2))
    md = rep.markdown(ctrl)
    header, _, *rows = ([c.strip() for c in line.split("|")] for line in md.splitlines())
    assert rows and all(r[header.index("pristine_std")] == "n/a" for r in rows)


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
    cal = rep.calibration(fake_metrics(strategies, lambda n, t: 0.5), {"S1": {"probs": probs, "labels": labels}}, scores)
    assert cal.loc[0, "rho_blur"] == pytest.approx(1) and cal.loc[0, "rho_noise"] == pytest.approx(-1)


def test_markdown():
    df = pd.DataFrame({"a": ["x", "y"], "b": [0.12345, float("nan")]})
    assert rep.markdown(df) == "| a | b |\n|---|---|\n| x | 0.123 |\n| y | n/a |\n"


def test_fig3_draws_the_papers_values_beside_ours(params, paper):
    metrics = fake_metrics(params.strategies, lambda n, t: 0.5)
    fig = figures.fig3(metrics, paper, params.report.fig3_panels, 3)
    ax = fig.axes[0]  # blur: S1, S2, S3
    faint = [ln for ln in ax.lines if ln.get_alpha() == figures.PAPER_STYLE["alpha"] and len(ln.get_xdata())]
    assert len(faint) == 3
    np.testing.assert_allclose(faint[0].get_ydata(), [0.794, 0.676, 0.524, 0.436])  # S1, paper
    assert len(ax.containers) == 3  # error bars: several seeds
    assert not figures.fig3(metrics, paper, params.report.fig3_panels, 1).axes[0].containers[0].has_yerr


def test_confidence_quality_bins_follow_the_score(params):
    scores = np.random.default_rng(0).uniform(0.2, 1, size=(3, 3, 300))
    conf = {"S1": scores, "S2": 1 - scores}
    fig = figures.confidence_quality(conf, params.strategies, scores, 5)
    s1, s2 = fig.axes[0].lines[:2]
    assert np.all(np.diff(s1.get_ydata()) > 0) and np.all(np.diff(s2.get_ydata()) < 0)
    np.testing.assert_allclose(s1.get_xdata(), s1.get_ydata())  # bin mean of score = of confidence
    assert [ln.get_label() for ln in fig.axes[1].lines] == ["S1"]  # S2 (mix_blur) not on the noise panel


def test_training_curves_average_over_seeds():
    logs = {"S1": pd.DataFrame({"epoch": [1, 2, 1, 2], "loss": [1.0, 0.5, 3.0, 1.5], "train_acc": [0.1, 0.2, 0.3, 0.4]})}
    fig = figures.training_curves(logs)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [2.0, 1.0])
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [0.2, 0.3])


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
