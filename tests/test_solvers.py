"""The small solvers: Wolfe's min-norm point, the CAGrad dual, the pivoted Cholesky solve."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from properties import assert_min_norm_optimal
from scipy.optimize import minimize
from strategies import build_jacobian, jacobians

from deconflict.linalg import pivoted_cholesky_solve
from deconflict.solvers import conflict_averse_weights, min_norm_point


@given(J=jacobians(scales=False))
def test_min_norm_point_satisfies_kkt(J):
    M = J @ J.T
    assert_min_norm_optimal(M, min_norm_point(M))


def test_min_norm_point_two_points_closed_form():
    """Segment [g1, g2]: w1 = (G22 - G12) / (G11 + G22 - 2 G12); g1 = (1, 0), g2 = (-1, 1)
    gives w1 = (2 + 1) / (1 + 2 + 2) = 3/5."""
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(min_norm_point(J @ J.T), [0.6, 0.4], rtol=1e-15)


def test_min_norm_point_three_points_hand_checked():
    """e1, e2, e3 in R^3: the min-norm point of the triangle is its centroid (1/3 each)."""
    np.testing.assert_allclose(min_norm_point(np.eye(3)), [1 / 3] * 3, rtol=1e-14)


def test_min_norm_point_with_zero_in_the_hull():
    J = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    w = min_norm_point(J @ J.T)
    assert np.linalg.norm(w @ J) < 1e-15


def cagrad_objective(M, anchor, c):
    radius = c * math.sqrt(anchor @ M @ anchor)
    return lambda w: w @ M @ anchor + radius * math.sqrt(max(w @ M @ w, 0.0))


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread", "rank_deficient", "wide"),
                   min_tasks=2, scales=False))
def test_cagrad_dual_equals_its_primal(J):
    """Strong duality: F(w*) = min_i g_i . D* with D* = g0 + c|g0| g_w / |g_w| (rescale 0)."""
    M = J @ J.T
    T = M.shape[0]
    anchor = np.full(T, 1.0 / T)
    for c in (0.1, 0.5, 0.9):
        w, gw_norm, g0_norm = conflict_averse_weights(M, anchor, c)
        if gw_norm == 0.0:
            continue
        D = (anchor + c * g0_norm / gw_norm * w) @ J
        dual = cagrad_objective(M, anchor, c)(w)
        primal = float(np.min(J @ D))
        scale = np.max(np.diag(M))
        assert abs(dual - primal) <= 1e-9 * scale
        # D is feasible: on the ball's boundary.
        g0 = anchor @ J
        assert np.linalg.norm(D - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9)


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread"), min_tasks=2, max_tasks=5,
                   scales=False))
def test_cagrad_dual_matches_an_independent_slsqp_solve(J):
    M = J @ J.T
    T = M.shape[0]
    anchor = np.full(T, 1.0 / T)
    objective = cagrad_objective(M, anchor, 0.5)
    w, _, _ = conflict_averse_weights(M, anchor, 0.5)
    reference = minimize(objective, anchor, method="SLSQP", bounds=[(0, 1)] * T,
                         constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
                         options={"ftol": 1e-15, "maxiter": 2000})
    # Ours can only be better or equal: SLSQP stops at a tolerance.
    assert objective(w) <= reference.fun + 1e-9 * np.max(np.diag(M))


def test_cagrad_dual_symmetric_case_by_hand():
    """g1 = (1, 0), g2 = (0, 1): by symmetry w* = (1/2, 1/2), so g_w = g0."""
    w, gw_norm, g0_norm = conflict_averse_weights(np.eye(2), np.full(2, 0.5), 0.5)
    np.testing.assert_allclose(w, [0.5, 0.5], rtol=1e-14)
    assert gw_norm == g0_norm == math.sqrt(0.5)


def test_pivoted_cholesky_solve_is_backward_stable_on_near_duplicates():
    J = build_jacobian("near_duplicate", 94, 4, 8, 0.0)
    n = np.linalg.norm(J, axis=1)
    K = (J @ J.T) / np.outer(n, n)
    x, rank = pivoted_cholesky_solve(K[1:, 1:], K[1:, 0], 1e-13)
    assert rank == 3
    assert np.abs(K[1:, 1:] @ x - K[1:, 0]).max() < 1e-12


def test_pivoted_cholesky_minimum_norm_splits_duplicates_evenly():
    K = np.ones((2, 2))
    x, rank = pivoted_cholesky_solve(K, np.ones(2), 1e-13, minimum_norm=True)
    assert rank == 1
    np.testing.assert_allclose(x, [0.5, 0.5], rtol=1e-15)
