"""The per-epoch mixture draw and the targets of each label rule."""
import zlib

import numpy as np
import pytest
import torch

from iqals import mixture
from iqals.params import Strategy
from iqals.seeds import derive_seed

SHARES = (0.60, 0.15, 0.15, 0.10)


def strat(train_set, labels="original", name="X"):
    return Strategy(name=name, train_set=train_set, labels=labels)


@pytest.mark.parametrize("n, want", [(50_000, [30_000, 7_500, 7_500, 5_000]), (2_000, [1_200, 300, 300, 200]),
                                     (200, [120, 30, 30, 20]),
                                     # not whole: 0.15 x 333 = 49.95 and 0.10 x 333 = 33.3, floored;
                                     # pristine takes the rest
                                     (333, [333 - 49 - 49 - 33, 49, 49, 33]), (7, [7 - 1 - 1 - 0, 1, 1, 0])])
def test_level_counts_are_exact(n, want):
    assert mixture.level_counts(n, SHARES) == want


@pytest.mark.parametrize("train_set", ["mix_blur", "mix_noise", "mix_jpeg", "mix_all3"])
def test_epoch_draw_counts_and_types(train_set):
    n = 2000
    s = strat(train_set)
    copy, image = mixture.epoch_draw(n, s, SHARES, seed=0, epoch=0)
    assert sorted(image.tolist()) == list(range(n))  # every image exactly once per epoch
    level = torch.where(copy == 0, 0, (copy - 1) % 3 + 1)
    assert torch.bincount(level, minlength=4).tolist() == [1200, 300, 300, 200]
    types = ((copy[copy > 0] - 1) // 3).tolist()
    allowed = {("blur", "noise", "jpeg").index(d) for d in s.distortions}
    assert set(types) == allowed
    if train_set == "mix_all3":  # uniform type choice: each type near 800/3 ... of 800 slots
        counts = np.bincount(types, minlength=3)
        assert counts.sum() == 800 and counts.min() > 800 / 3 - 60


def test_epoch_draw_is_reproducible_and_changes_between_epochs():
    s = strat("mix_all3")
    a = mixture.epoch_draw(500, s, SHARES, seed=3, epoch=1)
    b = mixture.epoch_draw(500, s, SHARES, seed=3, epoch=1)
    c = mixture.epoch_draw(500, s, SHARES, seed=3, epoch=2)
    d = mixture.epoch_draw(500, s, SHARES, seed=4, epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for other in (c, d):
        assert not torch.equal(a[0][torch.argsort(a[1])], other[0][torch.argsort(other[1])])  # copies
        assert not torch.equal(a[1], other[1])  # order


def test_mixes_on_one_seed_see_the_same_images_in_the_same_order_at_the_same_levels():
    """Paired comparisons: the draw depends on (seed, epoch) alone, not on the strategy's name,
    labels or distortion type (mixes only: a pristine draw takes no slots)."""
    level = lambda c: torch.where(c == 0, 0, (c - 1) % 3 + 1)  # noqa: E731
    base = mixture.epoch_draw(300, strat("mix_blur", name="S2"), SHARES, seed=2, epoch=1)
    for s in (strat("mix_blur", "iqa_ls", "S3"), strat("mix_noise", name="S4"), strat("mix_all3", "shuffled_ls", "R9")):
        copy, image = mixture.epoch_draw(300, s, SHARES, seed=2, epoch=1)
        assert torch.equal(image, base[1]) and torch.equal(level(copy), level(base[0])), s.name


def test_pristine_draws_only_pristine():
    copy, _ = mixture.epoch_draw(300, strat("pristine"), SHARES, seed=0, epoch=0)
    assert torch.all(copy == 0)


def test_soft_targets_eq2_by_hand():
    q = mixture.soft_targets(torch.tensor([2, 0]), torch.tensor([0.82, 1.0]))
    want = torch.full((2, 10), 0.02)
    want[0, 2] = 0.82
    want[1] = 0
    want[1, 0] = 1
    torch.testing.assert_close(q, want)
    torch.testing.assert_close(q.sum(1), torch.ones(2))


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    return rng.uniform(0.05, 1.0, size=(3, 3, 40))  # some below the 1/K floor


def test_original_is_one_hot(params, scores):
    q = mixture.true_class_probability(strat("mix_blur"), 40, None, params.iqa, SHARES, 0)
    assert q.shape == (10, 40) and np.all(q == 1)


def test_iqa_ls_uses_clipped_scores_of_its_own_copies(params, scores):
    q = mixture.true_class_probability(strat("mix_noise", "iqa_ls"), 40, scores, params.iqa, SHARES, 0)
    assert np.all(q[0] == 1)  # pristine stays one-hot
    for lv in range(3):
        np.testing.assert_array_equal(q[mixture.copy_index(1, lv)], np.clip(scores[1, lv], 0.1, 1.0))
        assert np.all(q[mixture.copy_index(0, lv)] == 1)  # blur copies: not drawn by mix_noise
    q = mixture.true_class_probability(strat("mix_all3", "iqa_ls"), 40, scores, params.iqa, SHARES, 0)
    for t in range(3):  # mix_all3: each type's copies its own scores
        for lv in range(3):
            np.testing.assert_array_equal(q[mixture.copy_index(t, lv)], np.clip(scores[t, lv], 0.1, 1.0))


def test_shuffled_keeps_distribution_breaks_link(params, scores):
    s = strat("mix_all3", "shuffled_ls")
    q = mixture.true_class_probability(s, 40, scores, params.iqa, SHARES, 0)
    iq = mixture.true_class_probability(strat("mix_all3", "iqa_ls"), 40, scores, params.iqa, SHARES, 0)
    np.testing.assert_array_equal(np.sort(q[1:].ravel()), np.sort(iq[1:].ravel()))
    assert np.mean(q[1:] == iq[1:]) < 0.1
    assert np.all(q[0] == 1)


def test_shuffled_mixes_types_in_mix_all3_and_each_seed_has_its_own_permutation(params):
    """mix_all3's shuffle runs across types within a level: with type-separated scores a blur copy
    gets noise and JPEG scores too. Seeds are replicates: each permutes anew, the same seed alike."""
    scores = np.stack([np.full((3, 200), v) for v in (0.9, 0.6, 0.3)])  # (types, levels, n)
    s = strat("mix_all3", "shuffled_ls", "R9")

    def shuffled(seed):
        return mixture.true_class_probability(s, 200, scores, params.iqa, SHARES, seed)
    q = shuffled(0)
    for lv in range(3):
        assert set(q[mixture.copy_index(0, lv)]) == {0.9, 0.6, 0.3}, lv
    assert np.array_equal(shuffled(1), shuffled(1)) and not np.array_equal(shuffled(1), q)


def test_derived_seeds_are_63_bit_and_differ_by_root_purpose_and_its_order():
    purposes = (("draw", 0), ("draw", 1), (0, "draw"), ("init",), ("shuffle", "R3"))
    keys = [(r, *p) for r in (0, 1, 2**31) for p in purposes]
    seeds = [derive_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [derive_seed(*k) for k in keys]  # the same purpose, the same seed
    # the documented construction, spelt out: words [root, crc32 of each purpose's text], the first 64-bit word of
    # numpy's SeedSequence, its top bit dropped; crc32 (unlike hash()) is the same in every process and machine
    for k, s in zip(keys, seeds):
        words = [k[0]] + [zlib.crc32(str(w).encode()) for w in k[1:]]
        assert s == int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0]) // 2, k


def test_image_streams_are_philox_keyed_by_official_position():
    """Stream i: Philox keyed by (key, index[i]), index 0..n-1 by default; an index of another length is refused."""
    from iqals.seeds import image_streams
    for index, pos in ((None, [0, 1, 2]), ([7, 3, 12], [7, 3, 12])):
        got = [g.standard_normal(4) for g in image_streams(11, 3, index)]
        want = [np.random.Generator(np.random.Philox(key=[11, j])).standard_normal(4) for j in pos]
        np.testing.assert_array_equal(got, want, err_msg=str(index))
    with pytest.raises(ValueError, match=r"corrupt: index has shape \(2,\), expected \(3,\)"):
        image_streams(11, 3, [0, 1], "corrupt")


def test_uniform_epsilon_matches_mean_iqa_epsilon(params, scores):
    s = strat("mix_blur", "uniform_ls")
    q = mixture.true_class_probability(s, 40, scores, params.iqa, SHARES, 0)
    t = np.clip(scores[0], 0.1, 1.0)  # blur levels
    eps_by_hand = sum(SHARES[lv + 1] * np.mean(10 * (1 - t[lv]) / 9) for lv in range(3))
    np.testing.assert_allclose(q, 1 - eps_by_hand * 9 / 10)  # every copy, pristine included


def test_scored_rule_without_scores_is_an_error(params):
    with pytest.raises(ValueError, match="needs scores"):
        mixture.true_class_probability(strat("mix_blur", "iqa_ls", "S3"), 40, None, params.iqa, SHARES, 0)


def _epsilon(q_rows):
    return 10 * (1 - q_rows) / 9


@pytest.mark.parametrize("train_set", ["mix_blur", "mix_all3"])
def test_shuffled_smooths_exactly_as_much_as_iqa_ls_per_epoch(params, train_set):
    """R's targets are IQA-LS's permuted within each level: the expected epsilon of an epoch (levels
    drawn 15/15/10) is IQA-LS's to 1e-12, and the epsilon of real draws agrees within sampling error.
    Levels with very different scores make a permutation across levels fail both checks."""
    rng = np.random.default_rng(5)
    n = 3000
    scores = np.stack([rng.uniform(lo, lo + 0.1, size=(3, n)) for lo in (0.85, 0.6, 0.3)], axis=1)
    iqa = mixture.true_class_probability(strat(train_set, "iqa_ls"), n, scores, params.iqa, SHARES, 0)
    shuf = mixture.true_class_probability(strat(train_set, "shuffled_ls", "R"), n, scores, params.iqa, SHARES, 0)
    used = iqa < 1  # the copies the mix draws (all scores here are below 1)
    assert np.array_equal(shuf < 1, used) and np.mean(shuf[used] == iqa[used]) < 0.05  # pairing broken
    assert mixture.mean_epsilon(shuf, strat(train_set), SHARES) == pytest.approx(
        mixture.mean_epsilon(iqa, strat(train_set), SHARES), abs=1e-12)
    for epoch in range(3):
        copy, image = mixture.epoch_draw(n, strat(train_set), SHARES, seed=0, epoch=epoch)
        e_iqa, e_shuf = _epsilon(iqa[copy, image]), _epsilon(shuf[copy, image])
        se = np.sqrt(e_iqa.var() / n + e_shuf.var() / n)
        assert abs(e_shuf.mean() - e_iqa.mean()) < 4 * se
