"""The small solvers: Wolfe's min-norm point, the CAGrad dual, the pivoted Cholesky solve."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from properties import assert_min_norm_optimal, assert_no_conflict, conflict_tolerances
from scipy.optimize import minimize
from strategies import STATIONARITY, build_jacobian, jacobians, stationary_jacobians
from torch import nn

import deconflict
from deconflict.linalg import pivoted_cholesky_solve
from deconflict.solvers import conflict_averse_weights, min_norm_point, nash_bargaining_weights


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


# --------------------------------------------------------------------- Nash-MTL without a solution
@settings(max_examples=80)
@given(data=st.data())
def test_nash_mtl_never_conflicts_converged_or_not(data):
    """Rank-deficient and wide Jacobians and every stationarity class: a third of these have 0
    in the hull, where the bargaining equation has no solution (the old last iterate conflicted
    in 641 of 2,000 such fuzzed cases). The update never conflicts; without convergence the
    repair is reported, and at a strongly stationary J the update is 0."""
    kind = data.draw(st.sampled_from(["strong", "weak", "none", "rank_deficient", "wide"]))
    if kind in STATIONARITY:
        J, _ = data.draw(stationary_jacobians(kind))
    else:
        J = data.draw(jacobians(kinds=(kind,), min_tasks=2, scales=False))
    method = deconflict.NashMTL(max_norm=0.0)
    c, diagnostics = method.weights_with_diagnostics(torch.from_numpy(J @ J.T))
    c = c.numpy()
    D = c @ J
    assert_no_conflict(J, D, conflict_tolerances(J, c))
    if not diagnostics["converged"]:
        assert diagnostics["fallback"]
    if kind == "strong":
        assert not diagnostics["converged"]
        assert diagnostics["stationary_tasks"].all()
        np.testing.assert_array_equal(D, np.zeros_like(D))
    if kind == "none":
        assert not diagnostics["stationary_tasks"].any()


def test_nash_mtl_bargains_among_the_tasks_that_can_improve():
    """g1 = (1, 0, 0) and g2 = -g1 cancel; g3 = (0, 1, 0), g4 = (0, 0.5, 1). No solution exists
    (Newton's alpha_1, alpha_2 run to 1e8 and its update conflicts with g2 by 3e-8). Every
    non-conflicting D has D_1 = 0, so Nash's limit is the bargaining solution of g3, g4 alone
    (both orthogonal to g1): alpha_i (g_i . D) = 1 for i = 3, 4, and weights 0 on g1, g2."""
    J = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, 0.5, 1.0]])
    c, diagnostics = deconflict.NashMTL(max_norm=0.0).weights_with_diagnostics(J @ J.T)
    c = c.numpy()
    assert not diagnostics["converged"] and diagnostics["fallback"]
    np.testing.assert_array_equal(diagnostics["stationary_tasks"].numpy(),
                                  [True, True, False, False])
    np.testing.assert_array_equal(c[:2], [0.0, 0.0])
    sub = J[2:] @ J[2:].T
    alpha, converged = nash_bargaining_weights(sub)
    assert converged
    np.testing.assert_allclose(c[2:], alpha, rtol=1e-10)
    D = c @ J
    assert D[0] == 0.0
    np.testing.assert_allclose(c[2:] * (J[2:] @ D), 1.0, rtol=1e-10)


def test_nash_mtl_fallback_reaches_the_step_record():
    """Through deconflict.backward: two tasks whose losses are L and -L (g2 = -g1) plus an
    independent one; the record says the solver did not converge and which repair was made."""
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4)
    z = trunk(torch.randn(5, 3))
    base = z[:, :2].pow(2).mean()
    losses = [base, -base, z[:, 2:].pow(2).mean()]
    record = deconflict.backward(losses, trunk, deconflict.NashMTL())
    assert record.diagnostics["converged"] is False
    assert record.diagnostics["fallback"] is True
    assert record.diagnostics["stationary_tasks"].tolist() == [True, True, False]
    # g_1 . D = g_2 . D = 0 up to float32 rounding of the 20 shared coordinates (and of the
    # weights applied in float32): 4 (20 + 3) eps32 ||g_i|| ||D||.
    products = record.update_products.numpy()
    norms = np.sqrt(np.diag(record.gramian.numpy())) * math.sqrt(record.update_sq_norm)
    assert np.all(products >= -4 * 23 * np.finfo(np.float32).eps * norms)
    assert products[2] > 0.0
