"""Evaluation metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deconflict.experiments.metrics import (
    accuracy,
    delta_m,
    hypervolume,
    mean_rank,
    pareto_front,
    roc_auc,
)


def test_auc_by_hand():
    """Positives score (0.8, 0.4), negatives (0.5, 0.1): of the 4 pairs, 3 are ordered right
    (0.8 > 0.5, 0.8 > 0.1, 0.4 > 0.1) and one wrong (0.4 < 0.5): AUC = 3/4."""
    assert roc_auc([1, 0, 1, 0], [0.8, 0.5, 0.4, 0.1]) == 0.75


def test_auc_counts_ties_half():
    """Positive 0.5 vs negatives (0.5, 0.2): one tie (1/2) and one win: (1 + 1/2) / 2 = 3/4."""
    assert roc_auc([1, 0, 0], [0.5, 0.5, 0.2]) == 0.75
    assert roc_auc([1, 0], [0.3, 0.3]) == 0.5


def test_auc_extremes_and_errors():
    assert roc_auc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [1, 2, 3, 4]) == 0.0
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc([1, 1], [0.1, 0.2])


def test_accuracy():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75


def test_delta_m_by_hand():
    """Accuracy 0.9 vs baseline 0.8 (higher better): -(0.9 - 0.8)/0.8 = -12.5%; error 0.2 vs 0.25
    (lower better): (0.2 - 0.25)/0.25 = -20%. Mean: -16.25%."""
    result = delta_m({"acc": 0.9, "err": 0.2}, {"acc": 0.8, "err": 0.25},
                     {"acc": True, "err": False})
    assert result == pytest.approx(-16.25)


def test_mean_rank_with_ties():
    """acc (higher better): A 0.9 first, B and C tie at 0.8 (rank 2.5 each); err (lower better):
    C 0.1 first, A 0.2 second, B 0.3 third. Means: A (1 + 2)/2, B (2.5 + 3)/2, C (2.5 + 1)/2."""
    table = {"A": {"acc": 0.9, "err": 0.2}, "B": {"acc": 0.8, "err": 0.3},
             "C": {"acc": 0.8, "err": 0.1}}
    assert mean_rank(table, {"acc": True, "err": False}) == {"A": 1.5, "B": 2.75, "C": 1.75}


def test_pareto_front():
    points = np.array([[1.0, 3.0], [2.0, 2.0], [1.5, 1.5], [3.0, 1.0], [0.5, 0.5]])
    assert pareto_front(points).tolist() == [0, 1, 3]


def test_hypervolume_two_dimensions_by_hand():
    """Points (1, 3), (2, 2), (3, 1) with reference (0, 0): a staircase of area
    1*3 + 1*2 + 1*1 = 6."""
    assert hypervolume(np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]), [0.0, 0.0]) == 6.0


def test_hypervolume_three_dimensions_by_hand():
    """Boxes [0,2]x[0,1]x[0,1] (volume 2) and [0,1]x[0,2]x[0,1] (volume 2) overlap in
    [0,1]x[0,1]x[0,1] (volume 1): union 3. A dominated point adds nothing."""
    points = np.array([[2.0, 1.0, 1.0], [1.0, 2.0, 1.0], [0.5, 0.5, 0.5]])
    assert hypervolume(points, [0.0, 0.0, 0.0]) == 3.0


def test_hypervolume_ignores_points_below_the_reference():
    assert hypervolume(np.array([[-1.0, 5.0]]), [0.0, 0.0]) == 0.0
    assert math.isclose(hypervolume(np.array([[2.0, 5.0]]), [1.0, 1.0]), 4.0)
