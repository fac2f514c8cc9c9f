"""Euclidean projection onto the probability simplex, shared by the stochastic multi-objective
methods that take projected gradient steps on their task weights (MoCo, MoDo, SDMGrad).

Pi(v) = argmin_{w >= 0, 1^T w = 1} ||w - v|| is w_i = max(v_i - tau, 0), with tau the unique
threshold making the sum 1: sorting v decreasingly as u, tau = (sum_{j <= k} u_j - 1) / k for the
largest k with u_k > (sum_{j <= k} u_j - 1) / k (Held, Wolfe & Crowder 1974; Duchi et al., ICML
2008, Fig. 1). O(T log T).

>>> project_onto_simplex(np.array([0.5, 0.2, -1.0])).round(12).tolist()  # tau = -0.15
[0.65, 0.35, 0.0]
"""

from __future__ import annotations

import numpy as np


def project_onto_simplex(v: np.ndarray) -> np.ndarray:
    """The point of the probability simplex nearest to v (float64, finite)."""
    # Pi(v + t 1) = Pi(v): shifting the largest entry to 0 keeps the test u_1 > u_1 - 1 exact
    # (for |v| ~ 1e17 and more, u_1 - 1 rounds to u_1) and the threshold's sums small.
    v = v - np.max(v)
    u = np.sort(v)[::-1]
    sums = np.cumsum(u) - 1.0
    k = np.arange(1, v.size + 1)
    support = int(np.flatnonzero(u > sums / k)[-1]) + 1  # k = 1 always qualifies: 0 > -1
    tau = sums[support - 1] / support
    return np.maximum(v - tau, 0.0)
