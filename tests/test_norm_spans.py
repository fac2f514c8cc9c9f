"""Min-norm style solvers over task-gradient norms spanning up to 1e12 (issue 13, item 3).

Every method that promises an update that conflicts with no task keeps the promise, whatever the
spread of the norms: MGDA and MGDA-UB (every normalizer), the tensioner (both bases), CAGrad with
c >= 1 and Nash-MTL (converged or not); CAGrad's dual is optimal at every c. Tolerances are the
rounding-error bounds of ``properties.conflict_tolerances`` (and, for the CAGrad dual's KKT
conditions, ``test_solvers.conflict_averse_tolerances``), which scale with the terms that
cancel, not with one machine's error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from properties import (
    as_array,
    assert_conflict_averse_optimal,
    assert_no_conflict,
    conflict_averse_tolerances,
    conflict_tolerances,
    exhaustive_dual_optimum,
    update,
)
from strategies import build_jacobian, norm_span_jacobians, spread_norms

import deconflict
from deconflict.methods import mgda as mgda_module
from deconflict.solvers import conflict_averse_solution, min_norm_solution

# The issue's case: norms 2.9e6, 2e-3 and 2e-5 (a span of 1.4e11).
ISSUE_J = np.array([[1.8e6, 1.8e6, 1.59e6], [-6e-4, 1.9e-3, 0.0], [2e-5, 0.0, 0.0]])

SPAN_METHODS = {
    "mgda": lambda: deconflict.MGDA(),
    "mgda_l2": lambda: deconflict.MGDA(normalizer="l2"),
    "mgda_loss+": lambda: deconflict.MGDA(normalizer="loss+"),
    "mgda_ub": lambda: deconflict.MGDAUB(),
    "tensioner_central": lambda: deconflict.get("tensioner", window=1),
    "tensioner_min_norm": lambda: deconflict.get("tensioner", window=1, base="min_norm"),
    "cagrad_c1": lambda: deconflict.CAGrad(c=1.0, rescale=0),
    "cagrad_c2": lambda: deconflict.CAGrad(c=2.0),
    "nash_mtl": lambda: deconflict.NashMTL(max_norm=0.0),
}


def weights_and_update(method, J, losses):
    c, diagnostics = method.weights_with_diagnostics(torch.from_numpy(J @ J.T), losses=losses)
    c = as_array(c)
    return c, c @ J, diagnostics


def test_issue_case_mgda_finds_the_exact_min_norm_point():
    """The min-norm point is on the segment [g_2, g_3]: w_2 = (G33 - G23) / (G22 + G33 - 2 G23)
    = (4e-10 + 1.2e-8) / (3.97e-6 + 4e-10 + 2.4e-8) = 0.0031043..., and g_1 . x >= ||x||^2 holds
    too, so (0, w_2, 1 - w_2) is optimal; before, the solver stopped at the vertex g_3
    (cos(D, g_2) = -0.30)."""
    G = ISSUE_J @ ISSUE_J.T
    w2 = (G[2, 2] - G[1, 2]) / (G[1, 1] + G[2, 2] - 2 * G[1, 2])
    w, verified = min_norm_solution(G)
    assert verified
    np.testing.assert_allclose(w, [0.0, w2, 1.0 - w2], rtol=1e-12)
    assert abs(w2 - 0.0031043) < 1e-7
    D = update(deconflict.MGDA(), ISSUE_J)
    cosines = ISSUE_J @ D / (np.linalg.norm(ISSUE_J, axis=1) * np.linalg.norm(D))
    assert cosines.min() > 0.009  # g_2's cosine is 0.00954; g_1's 0.756, g_3's 0.951


@given(J=norm_span_jacobians())
def test_min_norm_point_is_verified_optimal_over_norm_spans(J):
    M = J @ J.T
    w, verified = min_norm_solution(M)
    assert verified
    # KKT on the original Gramian, relative to the rounding bound of each constraint.
    tol = conflict_tolerances(J, w)
    Mw = M @ w
    assert np.all(Mw >= w @ Mw - tol), "a task's constraint (M w)_j >= w^T M w fails"
    assert_no_conflict(J, w @ J, tol)


@pytest.mark.parametrize("name", sorted(SPAN_METHODS))
@settings(max_examples=60)
@given(J=norm_span_jacobians())
def test_no_conflict_over_norm_spans(name, J):
    method = SPAN_METHODS[name]()
    losses = np.linspace(0.5, 2.0, J.shape[0])
    # Three calls: the tensioner (window 1) tensions from the third, Nash-MTL warm-starts.
    for step in range(3):
        c, D, diagnostics = weights_and_update(method, J, losses * (1.0 + 0.1 * step))
        assert_no_conflict(J, D, conflict_tolerances(J, c))
        if name == "nash_mtl" and diagnostics["converged"]:
            # The bargaining equation holds, so every task strictly improves.
            alpha = as_array(diagnostics["alpha"])
            np.testing.assert_allclose(alpha * (J @ (alpha @ J)), 1.0, atol=1e-6)


@pytest.mark.parametrize("span", [1.0, 1e6, 1e12])
def test_nash_mtl_is_covariant_under_task_rescaling(span):
    """alpha_i (M alpha)_i = 1 is covariant: rescaling g_i by s_i divides alpha_i by s_i and
    leaves D = J^T alpha unchanged, so the spread of the norms cannot change the update."""
    J = build_jacobian("random", 3, 4, 6, 0.0)
    scaled = spread_norms(J, 5, span)
    s = np.linalg.norm(scaled, axis=1) / np.linalg.norm(J, axis=1)
    _, D, diagnostics = weights_and_update(deconflict.NashMTL(max_norm=0.0), J, None)
    _, D_scaled, scaled_diagnostics = weights_and_update(deconflict.NashMTL(max_norm=0.0),
                                                          scaled, None)
    assert diagnostics["converged"] and scaled_diagnostics["converged"]
    np.testing.assert_allclose(as_array(scaled_diagnostics["alpha"]) * s,
                               as_array(diagnostics["alpha"]), rtol=1e-9)
    np.testing.assert_allclose(D_scaled, D, rtol=1e-9, atol=1e-12 * np.linalg.norm(D))


def test_mgda_falls_back_to_a_non_conflicting_direction_when_unverified(monkeypatch):
    """Should the active set stall (verified False) at a point that conflicts, MGDA does not
    hand it back: it projects it onto the dual cone and says so in ``fallback``. The stall is
    forced by replaying the old solver's answer on the issue's case, the vertex g_3."""
    monkeypatch.setattr(mgda_module, "min_norm_solution",
                        lambda M: (np.array([0.0, 0.0, 1.0]), False))
    c, D, diagnostics = weights_and_update(deconflict.MGDA(), ISSUE_J, None)
    assert diagnostics["converged"] is False and diagnostics["fallback"] is True
    assert_no_conflict(ISSUE_J, D, conflict_tolerances(ISSUE_J, c))
    assert np.linalg.norm(D) > 0.0



@settings(max_examples=80)
@given(J=norm_span_jacobians(), c=st.sampled_from([0.2, 0.5, 0.9, 1.0, 2.0]))
def test_cagrad_dual_is_optimal_over_norm_spans(J, c):
    """The CAGrad dual's KKT conditions on the original Gramian at every c, for norms spanning
    up to 1e12 (issue 13: before, ||g_w|| was resolved only to 1e-6 of the largest norm, so the
    small tasks' share of the optimum was lost beyond spans of ~1e6)."""
    anchor = np.full(J.shape[0], 1.0 / J.shape[0])
    solution = conflict_averse_solution(J @ J.T, anchor, c)
    assert solution.verified
    assert_conflict_averse_optimal(J, anchor, c, solution)


@pytest.mark.parametrize("c", [0.2, 0.5])
@settings(max_examples=40)
@given(J=norm_span_jacobians())
def test_cagrad_update_is_optimal_over_norm_spans(c, J):
    """Through the method (c < 1, where no-conflict is not promised but optimality is): the
    update D = J^T c_vec attains the dual value, g_i . D >= F(w*) for every task with equality
    on the dual's support (a vanishing optimum takes the documented degenerate path)."""
    _, D, diagnostics = weights_and_update(deconflict.CAGrad(c=c, rescale=0), J, None)
    if diagnostics["stationary"]:
        return
    anchor = np.full(J.shape[0], 1.0 / J.shape[0])
    w = as_array(diagnostics["dual_weights"])
    gw_norm = float(np.linalg.norm(w @ J))
    improvements = J @ D
    value = float(w @ improvements)
    tol = conflict_averse_tolerances(J, anchor, c, w, gw_norm)
    # D is formed from the float64 weights once more: (2 T + 2 d) eps n_i sigma, inside tol.
    assert np.all(improvements >= value - tol)
    support = w > 0.0
    assert np.all(np.abs(improvements[support] - value) <= tol[support])


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9, 2.0])
def test_cagrad_dual_on_the_issue_case_is_the_exact_optimum(c):
    """The issue's rows (norms 2.9e6, 2e-3, 2e-5): the dual's KKT conditions hold on M, and its
    value is the exact optimum of the exact J (60 digits over every face) to within
    sum_i w*_i tol_i (convexity, see ``test_solvers``)."""
    anchor = np.full(3, 1.0 / 3.0)
    solution = conflict_averse_solution(ISSUE_J @ ISSUE_J.T, anchor, c)
    assert solution.verified and solution.gw_norm > 0.0
    assert_conflict_averse_optimal(ISSUE_J, anchor, c, solution)
    best, best_w, value = exhaustive_dual_optimum(ISSUE_J, anchor, c)
    tol = conflict_averse_tolerances(ISSUE_J, anchor, c, solution.weights, solution.gw_norm)
    allowed = 2.0 * float(np.array([float(x) for x in best_w]) @ tol)
    gap = float(value([float(x) for x in solution.weights]) - best)
    assert gap <= allowed, f"F(w) - F* = {gap:.3e} > {allowed:.3e}"
