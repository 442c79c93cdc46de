"""Accuracy, confidence, NLL and ECE against hand-computed cases."""
import numpy as np
import pytest

from iqals import evaluate

# top confidences kept off the bin edges, where float rounding of the edges decides
PROBS = np.array([[0.72, 0.18, 0.1], [0.1, 0.63, 0.27], [0.2, 0.25, 0.55], [0.91, 0.05, 0.04]])
LABELS = np.array([0, 2, 2, 1])


def test_accuracy_confidence_nll():
    assert evaluate.accuracy(PROBS, LABELS) == 0.5
    np.testing.assert_allclose(evaluate.true_confidence(PROBS, LABELS), [0.72, 0.27, 0.55, 0.05])
    assert evaluate.nll(PROBS, LABELS) == pytest.approx(-np.mean(np.log([0.72, 0.27, 0.55, 0.05])))


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


def test_confidence_one_falls_in_last_bin():
    probs = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert evaluate.ece(probs, np.array([0, 1]), 15) == pytest.approx(0.5)


def test_test_sets_order_is_table2():
    x = np.zeros((2, 32, 32, 3), np.uint8)
    d = np.arange(9, dtype=np.uint8).reshape(3, 3, 1, 1, 1, 1) * np.ones((3, 3, 2, 32, 32, 3), np.uint8)
    sets = evaluate.test_sets(x, d)
    assert list(sets) == ["pristine", "blur_1", "blur_2", "blur_3", "noise_1", "noise_2", "noise_3",
                          "jpeg_1", "jpeg_2", "jpeg_3"]
    assert [int(v[0, 0, 0, 0]) for v in sets.values()][1:] == list(range(9))
