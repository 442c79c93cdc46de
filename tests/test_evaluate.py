"""Accuracy, confidence, NLL and ECE against hand-computed cases."""
import numpy as np
import pytest

from iqals import evaluate
from tests.conftest import close

# top confidences kept off the bin edges, where float rounding of the edges decides
PROBS = np.array([[0.72, 0.18, 0.1], [0.1, 0.63, 0.27], [0.2, 0.25, 0.55], [0.91, 0.05, 0.04]])
LABELS = np.array([0, 2, 2, 1])


def test_accuracy_confidence_nll():
    assert evaluate.accuracy(PROBS, LABELS) == 0.5
    np.testing.assert_allclose(evaluate.true_confidence(PROBS, LABELS), [0.72, 0.27, 0.55, 0.05])
    assert evaluate.nll(PROBS, LABELS) == pytest.approx(-np.mean(np.log([0.72, 0.27, 0.55, 0.05])))
    # a true class at probability 0 counts as 1e-12: -log(1e-12) = 12 ln 10, not infinity
    assert evaluate.nll(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([1, 0])) == pytest.approx((12 * np.log(10)
                                                                                                 + np.log(2)) / 2)


def test_ece_by_hand():
    # 2 bins: [0, .5) and [.5, 1]. Top confidences .72 (right), .63 (wrong), .55 (right), .91 (wrong):
    # all in bin 2 -> |acc 0.5 - mean conf 0.7025| = 0.2025
    assert evaluate.ece(PROBS, LABELS, 2) == pytest.approx(0.2025)
    # 10 bins: each sample alone in its bin, weight 1/4 each
    want = (abs(1 - 0.72) + abs(0 - 0.63) + abs(1 - 0.55) + abs(0 - 0.91)) / 4
    assert evaluate.ece(PROBS, LABELS, 10) == pytest.approx(want)


def test_ece_zero_when_calibrated():
    probs = np.array([[0.5, 0.5, 0.0]] * 4)  # top label 0 with confidence .5, right half the time
    assert evaluate.ece(probs, np.array([0, 1, 0, 1]), 15) == pytest.approx(0.0)


def test_confidence_on_a_bin_edge_falls_in_the_bin_above():
    # 1.0 wrong (correct - conf = -1) and 0.95 right (+0.05): together in bin [14/15, 1] they
    # give |-0.95| / 2; were 1.0 a bin of its own, (1 + 0.05) / 2
    probs = np.array([[1.0, 0.0], [0.95, 0.05]])
    assert evaluate.ece(probs, np.array([1, 0]), 15) == pytest.approx(0.95 / 2)
    # 4 bins, edges 0, .25, .5, .75, 1 exact in binary: .5 right (+.5) is alone in [.5, .75), .45 wrong (-.45) in
    # [.25, .5), .75 wrong (-.75) in [.75, 1]: (.5 + .45 + .75) / 3; were edges the bin below, .5 and .45 would share
    # [.25, .5) and give (|.5 - .45| + .75) / 3
    probs = np.array([[0.5, 0.3, 0.2], [0.45, 0.3, 0.25], [0.75, 0.25, 0.0]])
    assert evaluate.ece(probs, np.array([0, 1, 1]), 4) == pytest.approx((0.5 + 0.45 + 0.75) / 3)


def test_test_sets_order_is_table2():
    x = np.full((2, 32, 32, 3), 200, np.uint8)
    d = np.arange(9, dtype=np.uint8).reshape(3, 3, 1, 1, 1, 1) * np.ones((3, 3, 2, 32, 32, 3), np.uint8)
    sets = evaluate.test_sets(x, d)
    assert list(sets) == ["pristine", "blur_1", "blur_2", "blur_3", "noise_1", "noise_2", "noise_3",
                          "jpeg_1", "jpeg_2", "jpeg_3"]
    assert [int(v[0, 0, 0, 0]) for v in sets.values()] == [200] + list(range(9))  # distorted[type, level]


def test_aggregate_means_over_seeds_and_std_of_accuracy():
    cell = lambda acc, nll: {"acc": acc, "conf": 0.5, "nll": nll, "ece": 0.1}  # noqa: E731
    # each test set its own values (set i: accuracy 0.05 i + 0.3, + 0.4, + 0.8): a mix-up shows; three seeds,
    # skewed, so the mean (0.05 i + 0.5) is not the median; std: deviations -.2, -.1, .3, sum of squares .14 / 2
    per_seed = [{n: cell(0.05 * i + a, nll) for i, n in enumerate(evaluate.TEST_SETS)}
                for a, nll in ((0.3, 1.0), (0.4, 2.0), (0.8, 6.0))]
    out = evaluate.aggregate(per_seed)
    assert list(out) == list(evaluate.TEST_SETS)
    for i, n in enumerate(evaluate.TEST_SETS):
        assert out[n] == {"acc": round(0.05 * i + 0.5, 5), "conf": 0.5, "nll": 3.0, "ece": 0.1,
                          "acc_std": round(0.07 ** 0.5, 5)}, n
    assert evaluate.aggregate(per_seed[:1])["pristine"]["acc_std"] is None  # one seed: n/a, not 0


def test_unseen_summary_per_family_and_severity():
    # (seeds, families, severities) = (2, 2, 3): a mean over the wrong axis has another length or values
    acc = np.array([[[0.2, 0.4, 0.0], [0.6, 0.8, 0.4]], [[0.4, 0.6, 0.2], [0.8, 1.0, 0.6]]])
    out = evaluate.unseen_summary(acc, ("fog", "contrast"))
    assert out == {"fog": {"acc": 0.3, "by_severity": [0.3, 0.5, 0.1]},
                   "contrast": {"acc": 0.7, "by_severity": [0.7, 0.9, 0.5]}, "mean": 0.5}


def test_predict_is_the_softmax_of_the_standardised_channels_first_images(params, tiny_arrays):
    """predict against numpy: per-image standardisation, NHWC to NCHW as training feeds the network, the
    softmax over the ten classes, the network in float64; 12 read-only images in batches of 5 (the last short)."""
    import torch

    from iqals import model as model_lib

    images = tiny_arrays[1][0][:12]
    net = model_lib.build(params.model, 0)
    with torch.no_grad():
        net.out.weight.mul_(30)  # logits a few units apart, as a trained network's
    got = evaluate.predict(net, images, torch.device("cpu"), 5)
    a = images.astype(np.float64).reshape(12, -1)
    x = ((a - a.mean(1, keepdims=True)) / np.maximum(a.std(1, keepdims=True), 1 / np.sqrt(3072)))
    with torch.no_grad():
        z = net.double()(torch.from_numpy(x.reshape(12, 32, 32, 3).transpose(0, 3, 1, 2).copy())).numpy()
    e = np.exp(z - z.max(1, keepdims=True))
    assert got.dtype == np.float64 and got.shape == (12, 10)
    # float32 logits within close()'s bound for conv2's 5 x 5 x 64-term sums; a softmax moves by at most twice that
    np.testing.assert_allclose(got, e / e.sum(1, keepdims=True), rtol=0,
                               atol=2 * 8 * np.finfo(np.float32).eps * (5 * 5 * 64) ** 0.5 * np.abs(z).max())
    # the softmax in float64: logits = the output bias whatever the image; a class 200 below the top keeps its
    # probability exp(-200) (the NLL of a confidently wrong network), which a float32 softmax would round to 0
    bias = np.array([0.0, -200.0, -50.0, 3.0, 0.0, 0.0, -1.0, 2.0, 0.0, 0.5])
    with torch.no_grad():
        net.float().out.weight.zero_()
        net.out.bias.copy_(torch.from_numpy(bias))
    e = np.exp(bias - bias.max())
    np.testing.assert_allclose(evaluate.predict(net, images, torch.device("cpu"), 5), np.tile(e / e.sum(), (12, 1)),
                               rtol=1e-12, atol=0)


def test_evaluate_strategy_on_two_seeds(params, tiny_arrays, tmp_path):
    """The per-seed loop: probabilities per seed and test set, metrics from them, shape checks."""
    import dataclasses

    import torch

    from iqals import model as model_lib
    from iqals.data import DataError

    _, (images, labels) = tiny_arrays
    images, labels = images[:12], labels[:12]
    distorted = np.stack([np.stack([np.roll(images, t + lv, axis=1) for lv in range(3)]) for t in range(3)])
    p = dataclasses.replace(params, corrupt=dataclasses.replace(params.corrupt, families=("fog", "contrast"),
                                                                 severities=(2, 4)),
                            evaluate=dataclasses.replace(params.evaluate, ece_bins=1000))  # a bin per image
    # (families, severities, N, ...): two kinds, each two ways
    corrupted = np.stack([np.stack([images[:, ::-1], images[:, :, ::-1]]), np.stack([255 - images, images // 2])])
    for seed in (0, 1):
        torch.save({"model": model_lib.build(p.model, seed).state_dict()}, tmp_path / f"seed{seed}.pt")
    cpu = torch.device("cpu")
    files = {k: evaluate.read_model(tmp_path / f"seed{k}.pt") for k in (0, 1)}
    probs, m = evaluate.evaluate_strategy("S3", files, images, distorted, corrupted, labels, p, cpu)
    assert probs.shape == (2, 10, 12, 10) and probs.dtype == np.float32
    want = evaluate.predict(model_lib.build(p.model, 1), distorted[1, 2], cpu, 5)
    close(probs[1, evaluate.TEST_SETS.index("noise_3")], want, 5 * 5 * 64)  # other batches: conv2's sums
    assert m["per_seed_acc"]["seed1"]["noise_3"] == round(evaluate.accuracy(want, labels), 5)
    assert (m["strategy"], m["labels"], m["seeds"], m["test_images"]) == ("S3", "iqa_ls", [0, 1], 12)
    assert list(m["unseen"]) == list(p.corrupt.families) + ["mean"] and "along_training" not in m
    # every measure from each seed's predictions on the right set, with the right labels and bins
    # (the same predict calls as evaluate_strategy's: equal to the last digit)
    nets = {k: model_lib.build(p.model, k) for k in (0, 1)}
    sets = evaluate.test_sets(images, distorted)
    for name in ("pristine", "blur_2", "jpeg_3"):
        pr = [evaluate.predict(nets[k], sets[name], cpu, p.evaluate.batch_size) for k in (0, 1)]
        want = {"acc": [evaluate.accuracy(x, labels) for x in pr],
                "conf": [evaluate.true_confidence(x, labels).mean() for x in pr],
                "nll": [evaluate.nll(x, labels) for x in pr],
                "ece": [evaluate.ece(x, labels, p.evaluate.ece_bins) for x in pr]}
        assert {k: m[name][k] for k in want} == {k: round(float(np.mean(v)), 5) for k, v in want.items()}, name
        for k in (0, 1):  # the saved probabilities: each seed's on each set, in TEST_SETS order
            close(probs[k, evaluate.TEST_SETS.index(name)], pr[k], 5 * 5 * 64, f"seed{k} {name}")
    unseen = np.array([[[evaluate.accuracy(evaluate.predict(nets[k], x, cpu, p.evaluate.batch_size), labels) for x in f]
                        for f in corrupted] for k in (0, 1)])
    assert m["unseen"] == evaluate.unseen_summary(unseen, p.corrupt.families)
    pristine = np.array([m["per_seed_acc"][f"seed{k}"]["pristine"] for k in (0, 1)])
    assert (np.abs(unseen - pristine[:, None, None]) > 1e-4).any()  # the premise: scoring the wrong stack shows
    for bad in (corrupted[:1], corrupted[:, :1], corrupted[:, :, :6]):  # a family, a severity, images short
        with pytest.raises(DataError, match="rerun the corrupt stage"):
            evaluate.evaluate_strategy("S3", files, images, distorted, bad, labels, p, cpu)
    with pytest.raises(DataError, match="no trained model"):
        evaluate.read_model(tmp_path / "seed7.pt")
    with pytest.raises(DataError, match="no trained model"):
        evaluate.load_model(tmp_path / "seed7.pt", p, cpu)


def test_snapshots_are_scored_along_training(params, tiny_arrays, tmp_path):
    """A model file's snapshots (train.snapshot_every): each epoch's weights on every test set."""
    import dataclasses

    import torch

    from iqals import model as model_lib

    _, (images, labels) = tiny_arrays
    images, labels = images[:12], labels[:12]
    distorted = np.stack([np.stack([np.roll(images, t + lv, axis=1) for lv in range(3)]) for t in range(3)])
    # one corruption: the snapshots are scored on the ten test sets only
    params = dataclasses.replace(params, corrupt=dataclasses.replace(params.corrupt, families=("fog",),
                                                                     severities=(2,)))
    corrupted = np.zeros((1, 1, 12, 32, 32, 3), np.uint8)
    snaps = {5: model_lib.build(params.model, 1).state_dict(), 10: model_lib.build(params.model, 2).state_dict()}
    torch.save({"model": snaps[10], "snapshots": snaps}, tmp_path / "seed0.pt")
    torch.save({"model": snaps[10]}, tmp_path / "seed1.pt")  # trained without snapshots
    cpu = torch.device("cpu")
    sets = evaluate.test_sets(images, distorted)
    rows = evaluate.along_training(snaps, sets, labels, params, cpu)
    assert [r["epoch"] for r in rows] == [5, 10] and list(rows[0])[1:] == list(evaluate.TEST_SETS)
    for r, seed in zip(rows, (1, 2)):
        net = model_lib.build(params.model, seed)
        for name in ("pristine", "jpeg_2"):
            assert r[name] == round(evaluate.accuracy(evaluate.predict(net, sets[name], cpu, 5), labels), 5)
    assert evaluate.along_training({}, sets, labels, params, cpu) == []
    files = {k: evaluate.read_model(tmp_path / f"seed{k}.pt") for k in (0, 1)}
    _, m = evaluate.evaluate_strategy("S3", files, images, distorted, corrupted, labels, params, cpu)
    assert m["along_training"] == {"seed0": rows, "seed1": []}
    _, m = evaluate.evaluate_strategy("S3", {1: files[1]}, images, distorted, corrupted, labels, params, cpu)
    assert "along_training" not in m  # no snapshots: the metrics as before
