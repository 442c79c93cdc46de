"""Table 2 layout, the claims lines, the paired tests and the controls' epsilon."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from iqals import mixture, report as rep
from iqals.evaluate import TEST_SETS
from iqals.params import Strategy


@pytest.fixture
def paper(repo_root):
    return pd.read_csv(repo_root / "reference" / "paper_table2.csv")


def fake_metrics(strategies, acc_of):
    return {n: {"labels": s.labels, "train_set": s.train_set,
                **{t: {"acc": acc_of(n, t), "acc_std": 0.01, "ece": 0.1, "nll": 1.0, "conf": 0.5} for t in TEST_SETS}}
            for n, s in strategies.items()}


def test_table2_layout_and_differences(params, paper):
    metrics = fake_metrics(params.strategies, lambda n, t: 0.5)
    t2 = rep.table2(metrics, paper)
    assert list(t2["strategy"]) == [f"S{i}" for i in range(1, 10)]  # paper rows only, in order
    assert list(t2["train_set"]) == list(paper["train_set"])
    assert list(t2["regularization"]) == list(paper["regularization"])
    assert t2.loc[0, "pristine_paper"] == pytest.approx(0.794)
    assert t2.loc[0, "pristine_diff"] == pytest.approx(0.5 - 0.794)
    md = rep.table2_markdown(t2, n_seeds=1).splitlines()
    assert md[0] == "| S | labels | train set | " + " | ".join(TEST_SETS) + " |"
    assert md[2].startswith("| S1 | original | pristine | 50.0 (79.4, -29.4) | 50.0 (67.6, -17.6) |")
    assert "±1.0" in rep.table2_markdown(t2, n_seeds=3)


def test_claim_lines_compare_with_the_twin_on_the_trained_levels(params, paper):
    metrics = fake_metrics(params.strategies, lambda n, t: 0.6 if n == "S3" and t != "blur_3" else 0.5)
    lines = rep.claim_lines(params.strategies, metrics, paper)
    assert len(lines) == 4  # S3, S5, S7, S9
    assert lines[0].startswith("- S3 vs S2: beats it on 3 of 4 sets: pristine +10.0 (paper +1.7)")
    assert "blur_3 +0.0 (paper -0.2)" in lines[0] and "noise" not in lines[0]
    assert lines[3].startswith("- S9 vs S8: beats it on 0 of 10 sets")


def test_twin(params):
    assert rep.twin(params.strategies, "S3") == "S2"
    assert rep.twin(params.strategies, "U9") == "S8"
    assert rep.twin(params.strategies, "S5", "uniform_ls") == "U5"


def test_mcnemar_by_hand():
    a = np.array([True] * 10 + [False] * 2 + [True] * 5)
    b = np.array([False] * 10 + [True] * 2 + [True] * 5)
    assert rep.mcnemar_p(a, b) == pytest.approx(stats.binomtest(10, 12, 0.5).pvalue)
    assert rep.mcnemar_p(a, a) == 1.0


def test_paired_tests_use_per_seed_accuracy(params):
    labels = np.array([0, 1, 2, 3])
    good = np.eye(10)[labels]  # always right
    bad = np.eye(10)[(labels + 1) % 10]  # always wrong
    probs = lambda rows: np.stack([np.stack([r] * len(TEST_SETS)) for r in rows])  # noqa: E731
    strategies = {k: params.strategies[k] for k in ("S2", "S3")}
    preds = {"S2": {"probs": probs([bad, good]), "labels": labels},   # seeds: 0%, 100%
             "S3": {"probs": probs([good, good]), "labels": labels}}  # seeds: 100%, 100%
    df = rep.paired_tests(strategies, preds)
    assert len(df) == len(TEST_SETS) and set(df["strategy"]) == {"S3"}
    row = df.iloc[0]
    assert row["acc"] == 1.0 and row["twin_acc"] == 0.5 and row["diff"] == 0.5
    assert row["mcnemar_p"] == pytest.approx(stats.binomtest(4, 4, 0.5).pvalue)
    assert row["ttest_p"] == pytest.approx(stats.ttest_rel([1.0, 1.0], [0.0, 1.0]).pvalue, nan_ok=True)


def test_mix_epsilon_is_the_uniform_controls_epsilon(params):
    rng = np.random.default_rng(1)
    scores = rng.uniform(0.3, 1.0, size=(3, 3, 50))
    eps = rep.mix_epsilons(params.strategies, scores, params.iqa, params.mixture.shares)
    assert set(eps) == {"mix_blur", "mix_noise", "mix_jpeg", "mix_all3"}
    q = mixture.true_class_probability(Strategy("U", "mix_noise", "uniform_ls"), 50, scores, params.iqa,
                                       params.mixture.shares, 0)
    assert q[0, 0] == pytest.approx(1 - eps["mix_noise"] * 9 / 10)
    t = scores[1]  # noise levels; all above the clip
    assert eps["mix_noise"] == pytest.approx(sum(params.mixture.shares[lv + 1] * np.mean(10 * (1 - t[lv]) / 9)
                                                 for lv in range(3)))


def test_markdown():
    df = pd.DataFrame({"a": ["x", "y"], "b": [0.12345, 2.0]})
    assert rep.markdown(df) == "| a | b |\n|---|---|\n| x | 0.123 |\n| y | 2.000 |\n"
