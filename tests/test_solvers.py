"""The small solvers: Wolfe's min-norm point, the CAGrad dual, the pivoted Cholesky solve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from properties import (
    GOLDEN_RTOL,
    assert_conflict_averse_optimal,
    assert_min_norm_optimal,
    assert_no_conflict,
    conflict_averse_tolerances,
    conflict_tolerances,
    exhaustive_dual_optimum,
    resolution_factor,
)
from scipy.optimize import minimize
from strategies import (
    STATIONARITY,
    build_jacobian,
    jacobians,
    norm_span_jacobians,
    spread_norms,
    stationary_jacobians,
)
from torch import nn

import deconflict
from deconflict.linalg import pivoted_cholesky_solve
from deconflict.solvers import (
    conflict_averse_solution,
    conflict_averse_weights,
    min_norm_point,
    nash_bargaining_weights,
)


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


# ------------------------------------------------- the CAGrad dual, exact over norm spans
def test_cagrad_dual_small_task_is_the_worst_improvement_by_hand():
    """g1 = (1, 0), g2 = (0, e), e = 1e-12, c = 1/2: g0 = (1/2, e/2), r = |g0| / 2. Every D in
    the ball improves task 1 by about 1/2 and task 2 by at most e (e/2 + r), so the optimum puts
    all of r on g2: w* = (0, 1), ||g_w*|| = e, D = g0 + r (0, 1), and F(w*) = g2 . D =
    e (e/2 + r) <= g1 . D = 1/2. The old root find could not resolve ||g_w|| below 1e-6 and
    called this point stationary (||g_w|| = 0)."""
    e = 1e-12
    J = np.array([[1.0, 0.0], [0.0, e]])
    anchor = np.full(2, 0.5)
    solution = conflict_averse_solution(J @ J.T, anchor, 0.5)
    assert solution.verified
    np.testing.assert_array_equal(solution.weights, [0.0, 1.0])
    assert abs(solution.gw_norm - e) <= GOLDEN_RTOL * e
    g0_norm = math.sqrt(0.25 + e * e / 4)
    assert abs(solution.anchor_norm - g0_norm) <= GOLDEN_RTOL * g0_norm
    assert_conflict_averse_optimal(J, anchor, 0.5, solution)


@settings(max_examples=60)
@given(J=jacobians(min_tasks=2), c=st.sampled_from([0.2, 0.5, 0.9, 1.0, 2.0]))
def test_cagrad_dual_kkt_holds_on_every_input_class(J, c):
    anchor = np.full(J.shape[0], 1.0 / J.shape[0])
    solution = conflict_averse_solution(J @ J.T, anchor, c)
    assert solution.verified
    assert_conflict_averse_optimal(J, anchor, c, solution)


@settings(max_examples=25)
@given(J=norm_span_jacobians(max_tasks=5, max_dim=5), c=st.sampled_from([0.2, 0.5, 0.9, 2.0]))
def test_cagrad_dual_matches_an_exhaustive_extended_precision_solve(J, c):
    """Against the exact optimum of the exact J (60 digits, every face): F(w) - F* is at most
    sum_i w*_i tol_i (convexity: F(w) - F* <= grad F(w) . (w - w*), and grad_i F(w) >= F(w) -
    tol_i), twice for the two evaluations; a vanishing combination is within what M resolves of
    ||g_w||: (|g_a| + r) sqrt(resolution) tau."""
    T = J.shape[0]
    anchor = np.full(T, 1.0 / T)
    solution = conflict_averse_solution(J @ J.T, anchor, c)
    best, best_w, value = exhaustive_dual_optimum(J, anchor, c)
    ours = value([float(x) for x in solution.weights])
    gap = float(ours - best) if best_w is not None else 0.0
    if solution.gw_norm > 0.0:
        tol = conflict_averse_tolerances(J, anchor, c, solution.weights, solution.gw_norm)
        allowed = 2.0 * float(np.array([float(x) for x in best_w]) @ tol)
    else:
        n = np.linalg.norm(J, axis=1)
        allowed = (1 + c) * solution.anchor_norm * math.sqrt(resolution_factor(J)) * float(
            solution.weights @ n)
    assert gap <= allowed, f"F(w) - F* = {gap:.3e} > {allowed:.3e} (F* = {float(best):.6e})"


@pytest.mark.parametrize("c", [0.2, 0.5, 2.0])
def test_cagrad_dual_recovers_when_the_active_set_stalls(c, monkeypatch):
    """Should rounding stall the active set, the root find on the shifted min-norm problems
    finds the optimum's face and the active set finishes from there: same answer, verified.
    The stall is forced by failing the first descent."""
    from deconflict import solvers

    descend = solvers._ConflictAverseDual.descend
    for seed in range(12):
        J = spread_norms(build_jacobian("conflicting", seed, 2 + seed % 5, 6, 0.0), seed,
                         10.0 ** (seed % 13))
        anchor = np.full(J.shape[0], 1.0 / J.shape[0])
        expected = conflict_averse_solution(J @ J.T, anchor, c)
        calls = []

        def stalled_once(self, w, support, at_face_optimum, calls=calls):
            point, verified = descend(self, w, support, at_face_optimum)
            calls.append(verified)
            return point, verified and len(calls) > 1

        monkeypatch.setattr(solvers._ConflictAverseDual, "descend", stalled_once)
        solution = conflict_averse_solution(J @ J.T, anchor, c)
        monkeypatch.setattr(solvers._ConflictAverseDual, "descend", descend)
        if expected.gw_norm == 0.0:
            continue
        assert len(calls) == 2 and solution.verified
        assert_conflict_averse_optimal(J, anchor, c, solution)
        np.testing.assert_allclose(solution.weights, expected.weights, rtol=1e-9, atol=0.0)


@given(J=norm_span_jacobians(), c=st.sampled_from([0.3, 1.0, 3.0]),
       power=st.integers(-300, 300))
def test_cagrad_dual_depends_on_the_gramian_only_up_to_a_scalar(J, c, power):
    """Scaling M by 4^k (exact in binary) scales the norms by 2^k exactly and leaves the
    cosines and relative norms bitwise unchanged, so the weights are identical and ||g_w||,
    ||g_a|| scale by exactly 2^k: the solver depends on nothing but what F does."""
    M = J @ J.T
    scale = 4.0 ** (power // 4)
    if not np.isfinite(M * scale).all() or np.min(np.diag(M * scale)[np.diag(M) > 0],
                                                   initial=np.inf) == 0.0:
        return
    anchor = np.full(J.shape[0], 1.0 / J.shape[0])
    base = conflict_averse_solution(M, anchor, c)
    scaled = conflict_averse_solution(M * scale, anchor, c)
    np.testing.assert_array_equal(scaled.weights, base.weights)
    assert scaled.gw_norm == base.gw_norm * math.sqrt(scale)
    assert scaled.anchor_norm == base.anchor_norm * math.sqrt(scale)


def test_cagrad_dual_with_a_zero_gradient_by_hand():
    """g1 = (1, 0), g2 = 0, g3 = (-3, 0): g0 = (-2/3, 0). The zero gradient's vertex has F = 0;
    mixing it in scales F by (1 - t), so it is optimal unless F < 0 elsewhere. c = 0.2:
    r = 2/15 and F(e1) = g1 . g0 + r = -8/15 < 0 is the optimum (D = g0 + r g1 = (-8/15, 0):
    g1 . D = -8/15 <= g2 . D = 0 <= g3 . D = 8/5). c = 2: F >= 0 everywhere, the optimum is
    the vanishing combination e2 (||g_w|| = 0)."""
    J = np.array([[1.0, 0.0], [0.0, 0.0], [-3.0, 0.0]])
    anchor = np.full(3, 1.0 / 3.0)
    small = conflict_averse_solution(J @ J.T, anchor, 0.2)
    np.testing.assert_array_equal(small.weights, [1.0, 0.0, 0.0])
    assert small.gw_norm == 1.0 and small.verified
    D = (anchor + 0.2 * small.anchor_norm / small.gw_norm * small.weights) @ J
    np.testing.assert_allclose(D, [-8.0 / 15.0, 0.0], rtol=GOLDEN_RTOL)
    large = conflict_averse_solution(J @ J.T, anchor, 2.0)
    np.testing.assert_array_equal(large.weights, [0.0, 1.0, 0.0])
    assert large.gw_norm == 0.0 and large.verified
