"""UPGrad, DualProj, Aligned-MTL and Nash-MTL: golden values and defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from properties import (
    GOLDEN_RTOL,
    assert_no_conflict,
    conflict_tolerances,
    gamma,
    nnls_kkt_rtol,
    update,
)
from strategies import jacobians

import deconflict


# ----------------------------------------------------------------------------------- UPGrad
def test_upgrad_golden_two_tasks():
    """g1 = (1, 0), g2 = (-1, 1), pref 1/2 each.

    g1/2 = (1/2, 0) conflicts with g2 (g2 . g1/2 = -1/2): its projection onto {x : g2 . x >= 0}
    is (1/2, 0) + (1/2)/2 (-1, 1) = (1/4, 1/4), which also has g1 . x >= 0: the dual cone point.
    g2/2 = (-1/2, 1/2) conflicts with g1: (-1/2, 1/2) + (1/2)(1, 0) = (0, 1/2), g2 . x = 1/2 >= 0.
    D = (1/4, 1/4) + (0, 1/2) = (1/4, 3/4).
    """
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(update(deconflict.UPGrad(), J), [0.25, 0.75], rtol=GOLDEN_RTOL)


@given(J=jacobians())
def test_upgrad_projections_lie_in_the_dual_cone(J):
    """Each projected gradient J^T v_i satisfies J (J^T v_i) >= 0 and v_i >= p_i e_i."""
    _, diagnostics = deconflict.UPGrad().weights_with_diagnostics(J @ J.T)
    V = diagnostics["projection_coefficients"].numpy()
    T = J.shape[0]
    M = J @ J.T
    # v = (n u + z) / n with z >= 0: three roundings below u at most.
    assert (V >= (1 - gamma(3)) * np.eye(T) / T).all()
    # KKT of each projection, in exact arithmetic on M: M v_i >= 0 up to rounding
    # (n_k n_j <= max M_jj bounds each term of (M v)_k).
    rounding = nnls_kkt_rtol(T) * np.diag(M).max() * np.abs(V).sum(axis=1)
    assert ((M @ V.T) >= -rounding[None, :]).all()


def test_dualproj_golden():
    """g1 = (1, 0), g2 = (-2, 1): the mean (-1/2, 1/2) conflicts with g1; its projection onto
    {g1 . x >= 0} is (0, 1/2), and g2 . (0, 1/2) = 1/2 >= 0, so D = (0, 1/2)."""
    J = np.array([[1.0, 0.0], [-2.0, 1.0]])
    np.testing.assert_allclose(update(deconflict.DualProj(), J), [0.0, 0.5], atol=GOLDEN_RTOL)


def test_dualproj_keeps_a_non_conflicting_mean():
    J = np.array([[1.0, 0.2], [0.3, 1.0]])
    np.testing.assert_allclose(update(deconflict.DualProj(), J), J.mean(axis=0), rtol=1e-14)


def test_preference_vector_is_validated():
    with pytest.raises(deconflict.InvalidOptionError, match="pref_vector"):
        deconflict.UPGrad(pref_vector=[1.0, -1.0])
    with pytest.raises(deconflict.ShapeError, match="pref_vector has 2 entries for 3 tasks"):
        deconflict.UPGrad(pref_vector=[1.0, 1.0]).weights(np.eye(3))


# ------------------------------------------------------------------------------ Aligned-MTL
def test_aligned_mtl_golden_orthogonal_gradients():
    """g1 = (2, 0), g2 = (0, 1): M = diag(4, 1), B = sqrt(sigma) diag(1/2, 1).
    "min" and "median" (lower median of {1, 4}): sigma = 1, c = B 1 = (1/2, 1), D = (1, 1);
    "rmse": sigma = 5/2, D = sqrt(5/2) (1, 1)."""
    J = np.array([[2.0, 0.0], [0.0, 1.0]])
    for mode in ("min", "median"):
        np.testing.assert_allclose(update(deconflict.AlignedMTL(mode), J), [1.0, 1.0],
                                   rtol=1e-14)
    np.testing.assert_allclose(update(deconflict.AlignedMTL("rmse"), J),
                               [math.sqrt(2.5)] * 2, rtol=1e-14)


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread"), min_tasks=2, scales=False))
def test_aligned_gradients_are_orthogonal_with_equal_norms(J):
    M = J @ J.T
    values = np.linalg.eigvalsh(M)
    if values[0] < 1e-6 * values[-1]:
        return  # the property holds on the range of M; skip ill-conditioned draws
    _, diagnostics = deconflict.AlignedMTL().weights_with_diagnostics(M)
    aligned = diagnostics["balance"].numpy() @ J
    np.testing.assert_allclose(aligned @ aligned.T, values[0] * np.eye(J.shape[0]),
                               atol=1e-9 * values[-1])


# --------------------------------------------------------------------------------- Nash-MTL
def test_nash_mtl_golden():
    """g1 = (1, 0), g2 = (1, 1): M = [[1, 1], [1, 2]]. alpha_1 (alpha_1 + alpha_2) = 1 and
    alpha_2 (alpha_1 + 2 alpha_2) = 1 give alpha_1^2 = 2 alpha_2^2, alpha_2 = 1/sqrt(2 + sqrt 2),
    alpha_1 = sqrt 2 alpha_2; ||D||^2 = alpha^T M alpha = 2 = T (unclipped)."""
    J = np.array([[1.0, 0.0], [1.0, 1.0]])
    a2 = 1.0 / math.sqrt(2.0 + math.sqrt(2.0))
    alpha = np.array([math.sqrt(2.0) * a2, a2])
    np.testing.assert_allclose(update(deconflict.NashMTL(max_norm=0.0), J), alpha @ J,
                               rtol=1e-12)
    clipped = update(deconflict.NashMTL(max_norm=1.0), J)
    np.testing.assert_allclose(clipped, alpha @ J / math.sqrt(2.0), rtol=1e-12)


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread"), min_tasks=2))
def test_nash_mtl_solves_the_bargaining_equation(J):
    M = J @ J.T
    if np.linalg.eigvalsh(M / np.diag(M).max())[0] < 1e-6:
        return  # near-stationary: alpha diverges by design
    _, diagnostics = deconflict.NashMTL().weights_with_diagnostics(M)
    alpha = diagnostics["alpha"].numpy()
    assert diagnostics["converged"]
    np.testing.assert_allclose(alpha * (M @ alpha), 1.0, atol=1e-10)


def test_nash_mtl_update_weights_every_reuses_alpha():
    J1 = np.array([[1.0, 0.0], [1.0, 1.0]])
    J2 = np.array([[2.0, 0.5], [0.5, 1.0]])  # the reused weights harm neither task here
    method = deconflict.NashMTL(max_norm=0.0, update_weights_every=2)
    first = method.weights(J1 @ J1.T)
    reused, diagnostics = method.weights_with_diagnostics(J2 @ J2.T)
    assert not diagnostics["recomputed"] and not diagnostics["fallback"]
    np.testing.assert_array_equal(reused.numpy(), first.numpy())
    _, diagnostics = method.weights_with_diagnostics(J2 @ J2.T)
    assert diagnostics["recomputed"]


def test_nash_mtl_reused_alpha_that_conflicts_is_repaired():
    J1 = np.array([[1.0, 0.0], [1.0, 1.0]])
    J2 = np.array([[2.0, 0.5], [-1.0, 1.0]])  # J2 J2^T alpha_1 has a negative entry
    method = deconflict.NashMTL(max_norm=0.0, update_weights_every=2)
    first = method.weights(J1 @ J1.T).numpy()
    assert (J2 @ (J2.T @ first)).min() < 0
    reused, diagnostics = method.weights_with_diagnostics(J2 @ J2.T)
    assert not diagnostics["recomputed"] and diagnostics["fallback"]
    c = reused.numpy()
    assert_no_conflict(J2, J2.T @ c, conflict_tolerances(J2, c))


def test_nash_mtl_pareto_stationary_reports_non_convergence():
    J = np.array([[1.0, 0.0], [-2.0, 0.0]])
    _, diagnostics = deconflict.NashMTL().weights_with_diagnostics(J @ J.T)
    assert not diagnostics["converged"]
    np.testing.assert_array_equal(update(deconflict.NashMTL(), J), np.zeros(2))
