"""MGDA: optimality of the min-norm point, normalizers, golden values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from properties import assert_min_norm_optimal, assert_non_conflicting, update
from strategies import jacobians

import deconflict


@given(J=jacobians())
def test_weights_are_the_min_norm_point(J):
    M = J @ J.T
    _, diagnostics = deconflict.MGDA().weights_with_diagnostics(M)
    assert_min_norm_optimal(M, diagnostics["alpha"].numpy())


@given(J=jacobians(min_tasks=2))
def test_normalized_gradients_give_the_min_norm_point_of_their_hull(J):
    n = np.linalg.norm(J, axis=1)
    losses = np.linspace(0.3, 3.0, J.shape[0])
    for normalizer, nu in (("l2", np.where(n > 0, n, 1.0)), ("loss", losses),
                           ("loss+", losses * np.where(n > 0, n, 1.0))):
        method = deconflict.MGDA(normalizer=normalizer)
        _, diagnostics = method.weights_with_diagnostics(J @ J.T, losses=losses)
        Jn = J / nu[:, None]
        assert_min_norm_optimal(Jn @ Jn.T, diagnostics["alpha"].numpy())
        assert_non_conflicting(J, update(method, J, losses=losses))


def test_golden_two_tasks():
    """g1 = (1, 0), g2 = (-1, 1): alpha_1 = (G22 - G12)/(G11 + G22 - 2 G12) = 3/5,
    D = 3/5 (1, 0) + 2/5 (-1, 1) = (1/5, 2/5); both tasks improve by g_i . D = 1/5."""
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(update(deconflict.MGDA(), J), [0.2, 0.4], rtol=1e-15)


def test_golden_l2_normalizer_raw_and_normalized():
    """Same J with nu = (1, sqrt 2): Mt has Mt_11 = Mt_22 = 1, Mt_12 = -1/sqrt 2, so
    alpha = (1/2, 1/2). normalized: D = g1/2 + g2/(2 sqrt 2); raw: D = (g1 + g2)/2 = (0, 1/2)."""
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    s2 = math.sqrt(2.0)
    normalized = update(deconflict.MGDA(normalizer="l2"), J)
    np.testing.assert_allclose(normalized, [0.5 - 0.5 / s2, 0.5 / s2], rtol=1e-14)
    raw = update(deconflict.MGDA(normalizer="l2", update_from="raw"), J)
    np.testing.assert_allclose(raw, [0.0, 0.5], atol=1e-15)


def test_zero_gradient_stops_mgda():
    J = np.array([[1.0, 2.0], [0.0, 0.0], [-3.0, 1.0]])
    for normalizer in ("none", "l2"):
        np.testing.assert_array_equal(update(deconflict.MGDA(normalizer=normalizer), J),
                                      np.zeros(2))


def test_loss_normalizer_needs_positive_losses():
    J = np.eye(2)
    with pytest.raises(deconflict.InvalidOptionError, match="needs the losses"):
        deconflict.MGDA(normalizer="loss").weights(J @ J.T)
    with pytest.raises(deconflict.InvalidOptionError, match="not positive"):
        deconflict.MGDA(normalizer="loss").weights(J @ J.T, losses=[1.0, 0.0])


def test_unknown_normalizer_is_rejected():
    with pytest.raises(deconflict.InvalidOptionError, match="normalizer"):
        deconflict.MGDA(normalizer="norm")


def test_mgda_ub_golden_loss_plus_normalizer():
    """MGDA-UB's default normalizer "loss+": nu_i = L_i ||g_i||. g1 = (2, 0), g2 = (0, 1) with
    losses (1, 2): nu = (2, 2), the normalized gradients are (1, 0) and (0, 1/2), whose min-norm
    point has alpha = (1/5, 4/5) (segment formula: (1/4 - 0)/(1 + 1/4)); the update applies alpha
    to the normalized gradients: D = (1/5)(1, 0) + (4/5)(0, 1/2) = (1/5, 2/5)."""
    J = np.array([[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(update(deconflict.MGDAUB(), J, losses=[1.0, 2.0]), [0.2, 0.4],
                               rtol=1e-15)


def test_sum_and_mean_golden():
    """g1 = (1, 0), g2 = (-1, 1): sum (0, 1), mean (0, 1/2)."""
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_array_equal(update(deconflict.Sum(), J), [0.0, 1.0])
    np.testing.assert_array_equal(update(deconflict.Mean(), J), [0.0, 0.5])
