"""IMTL-G: equal projections, golden values, and the two documented deviations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from properties import assert_non_conflicting, gamma, update
from strategies import jacobians

import deconflict
from deconflict.methods.imtl_g import imtl_g_weights


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread", "duplicate", "zero_row"),
                   min_tasks=2, scales=False))
def test_projections_on_the_unit_gradients_are_equal(J):
    alpha, diagnostics = imtl_g_weights(J @ J.T, "flip")
    assume(diagnostics["feasible"])
    D = alpha @ J
    norms = np.linalg.norm(J, axis=1)
    live = norms > 0
    projections = (J[live] @ D) / norms[live]
    assert np.ptp(projections) <= 1e-9 * max(np.abs(projections).max(), 1e-300)


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread"), min_tasks=2, scales=False))
def test_weights_sum_to_one_when_the_raw_sum_is_positive(J):
    alpha, diagnostics = imtl_g_weights(J @ J.T, "flip")
    assume(diagnostics["feasible"] and diagnostics["sum_of_raw_weights"] > 0)
    assert alpha.sum() == pytest.approx(1.0, rel=1e-12)


def test_golden_two_tasks():
    """For T = 2, a = M^-1 n = (1/(n1 (1 + rho)), 1/(n2 (1 + rho))), so alpha ~ (1/n1, 1/n2).
    g1 = (1, 0), g2 = (-1, 1): alpha = (1, 1/sqrt 2) / (1 + 1/sqrt 2) = (2 - sqrt 2, sqrt 2 - 1),
    D = (3 - 2 sqrt 2, sqrt 2 - 1), with projection 3 - 2 sqrt 2 on both unit gradients."""
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    s2 = math.sqrt(2.0)
    np.testing.assert_allclose(update(deconflict.IMTLG(), J), [3 - 2 * s2, s2 - 1], rtol=1e-14)


def sign_flipping_jacobian() -> np.ndarray:
    """A well-conditioned case where 1^T M^-1 n < 0 (~4% of draws; docs/methods.md#imtl_g)."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        J = rng.standard_normal((3, 4)) * np.exp(rng.uniform(-1, 1, (3, 1)))
        M = J @ J.T
        if np.linalg.cond(M) < 100 and np.linalg.solve(M, np.sqrt(np.diag(M))).sum() < 0:
            return J
    raise AssertionError("no sign-flipping case found")


def test_sign_guard_fixes_the_reference_direction():
    J = sign_flipping_jacobian()
    reference = update(deconflict.IMTLG(sign_guard="off"), J)
    # The reference update increases every loss to first order.
    assert (J @ reference < 0).all()
    guarded = update(deconflict.IMTLG(), J)
    assert (J @ guarded > 0).all()
    np.testing.assert_allclose(guarded, -reference, rtol=1e-12)
    mean = update(deconflict.IMTLG(sign_guard="mean"), J)
    # The mean of T rows: gamma_T of sum |g_i| / T, evaluated twice (ours and NumPy's).
    T = J.shape[0]
    np.testing.assert_allclose(mean, J.mean(axis=0), rtol=0,
                               atol=2 * gamma(T + 1) * np.abs(J).sum(axis=0).max() / T)


@given(J=jacobians())
def test_guarded_update_never_conflicts(J):
    assert_non_conflicting(J, update(deconflict.IMTLG(), J))


def test_opposite_gradients_have_no_equal_projection_direction():
    J = np.array([[1.0, 0.0], [-2.0, 0.0]])
    alpha, diagnostics = imtl_g_weights(J @ J.T, "flip")
    assert not diagnostics["feasible"]
    np.testing.assert_array_equal(alpha, np.zeros(2))


def test_duplicated_tasks_are_treated_symmetrically():
    """Duplicates make the solution of K x = 1 non-unique; the minimum-norm one is symmetric."""
    g = np.array([1.0, 2.0])
    J = np.stack([g, 3.0 * g, np.array([-1.0, 0.5])])
    swapped = J[[1, 0, 2]]
    np.testing.assert_allclose(update(deconflict.IMTLG(), J), update(deconflict.IMTLG(), swapped),
                               rtol=1e-12)
