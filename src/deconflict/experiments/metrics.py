"""Evaluation and comparison metrics (NumPy, float64).

- ``roc_auc``: area under the ROC curve, with ties counted half (Mann-Whitney U / (n+ n-)).
- ``delta_m``: the average relative change against a single-task baseline, in percent, sign
  chosen so that lower is better (CAGrad paper, Section 5; GradOPS Section 4):
  Delta_m = (100 / K) sum_k (-1)^{h_k} (M_k - B_k) / B_k, with h_k = 1 when higher is better.
- ``mean_rank``: each method's rank per metric (1 = best, ties share the mean rank), averaged.
- ``pareto_front`` and ``hypervolume``: non-dominated points and the volume they dominate up to a
  reference point, all objectives maximized (negate the ones to minimize first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 P(tie)."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels for {scores.size} scores")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both positive and negative labels")
    ranks = rankdata(scores)  # average ranks: ties count half
    return float((ranks[labels].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    labels, predictions = np.asarray(labels).reshape(-1), np.asarray(predictions).reshape(-1)
    return float(np.mean(labels == predictions))


def delta_m(
    method: Mapping[str, float], baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    """Average relative change (%) over the baseline's metrics; negative is better."""
    terms = []
    for name, base in baseline.items():
        if base == 0:
            raise ValueError(f"Delta_m is undefined: the baseline's {name} is 0")
        sign = -1.0 if higher_is_better[name] else 1.0
        terms.append(sign * (method[name] - base) / abs(base))
    return 100.0 * float(np.mean(terms))


def mean_rank(
    table: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, bool]
) -> dict[str, float]:
    """Rank the methods (rows) on each metric (1 = best; ties share), then average per method."""
    methods = list(table)
    ranks = np.zeros(len(methods))
    for metric, higher in higher_is_better.items():
        values = np.array([table[m][metric] for m in methods], dtype=np.float64)
        ranks += rankdata(-values if higher else values)
    return {m: float(r / len(higher_is_better)) for m, r in zip(methods, ranks, strict=True)}


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the points no other point dominates (all objectives maximized)."""
    points = np.asarray(points, dtype=np.float64)
    keep = []
    for i, p in enumerate(points):
        dominated = np.any(np.all(points >= p, axis=1) & np.any(points > p, axis=1))
        if not dominated:
            keep.append(i)
    return np.array(keep, dtype=int)


def hypervolume(points: np.ndarray, reference: Sequence[float] | np.ndarray) -> float:
    """Volume of the region dominated by the points and bounded below by ``reference``
    (objectives maximized). Exact, by slicing along the first objective (fine for the tens of
    points of a sweep, in any dimension)."""
    points = np.asarray(points, dtype=np.float64)
    floor = np.asarray(reference, dtype=np.float64)
    if points.size == 0:
        return 0.0
    points = points[np.all(points > floor, axis=1)]
    if points.size == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(points[:, 0].max() - floor[0])
    order = np.argsort(-points[:, 0])
    points = points[order]
    volume = 0.0
    for k in range(len(points)):
        upper = points[k, 0]
        lower = points[k + 1, 0] if k + 1 < len(points) else floor[0]
        if upper > lower:
            volume += (upper - lower) * hypervolume(points[:k + 1, 1:], floor[1:])
    return volume
