"""The task tensioner: bases, warm-up, tension factors (Eq. 5-8), constraint, checkpointing."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from properties import assert_non_conflicting, update

import deconflict
from deconflict.methods.tensioner import base_direction, tension_factors

ALPHA = 0.3


def test_central_base_is_the_scaled_bisector():
    """g1 = (2, 0), g2 = (0, 1): unit gradients e1, e2, k* = (1/2, 1/2),
    gamma = 1 / (k1/n1 + k2/n2) = 1 / (1/4 + 1/2) = 4/3, v = gamma (e1 + e2)/2 = (2/3, 2/3),
    i.e. p = (k/n) / sum(k/n) = (1/3, 2/3)."""
    J = np.array([[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(base_direction(J @ J.T, "central"), [1 / 3, 2 / 3], rtol=1e-14)
    # min-norm base: the MGDA point of the segment [(2, 0), (0, 1)]: w1 = 1/5, v = (2/5, 4/5).
    np.testing.assert_allclose(base_direction(J @ J.T, "min_norm"), [0.2, 0.8], rtol=1e-14)


def test_warm_up_returns_the_base_direction_for_window_steps():
    J = np.array([[2.0, 0.0], [0.0, 1.0]])
    method = deconflict.Tensioner(window=3)
    for _ in range(3):
        c, diagnostics = method.weights_with_diagnostics(J @ J.T, losses=[1.0, 1.0])
        assert not diagnostics["tensioned"]
        np.testing.assert_allclose(c.numpy(), [1 / 3, 2 / 3], rtol=1e-14)
    # Step W + 1: zeta(t) and zeta(t - 1) exist, tensions start (Algorithm 1, i >= T).
    _, diagnostics = method.weights_with_diagnostics(J @ J.T, losses=[1.0, 1.0])
    assert diagnostics["tensioned"]


def test_golden_tension_step():
    """Constant gradients g1 = (2, 0), g2 = (0, 1), so zeta(t) / zeta(t - 1) = 1.

    Losses (10, 1): delta = 1 + log10 L = (2, 1) (Eq. 6); Eq. 7 with alpha = 0.3:
    c_1 = 0.3 / (1 + exp(-e)) + 0.7 = 0.98143..., c_2 = 0.3 / 2 + 0.7 = 0.85.
    v = (2/3, 2/3); g1 - v = (4/3, -2/3) has unit (2, -1)/sqrt 5 and g2 - v the opposite one,
    so U = (c_1 - c_2)(2, -1)/sqrt 5 and v_n = v + U (no constraint is active: both g . v_n > 0).
    """
    J = np.array([[2.0, 0.0], [0.0, 1.0]])
    method = deconflict.Tensioner(alpha=ALPHA, window=2)
    for _ in range(2):
        method.weights(J @ J.T, losses=[10.0, 1.0])
    c, diagnostics = method.weights_with_diagnostics(J @ J.T, losses=[10.0, 1.0])
    c1 = 0.3 / (1 + math.exp(-math.e)) + 0.7
    np.testing.assert_allclose(diagnostics["delta"].numpy(), [2.0, 1.0], rtol=1e-15)
    np.testing.assert_allclose(diagnostics["tension_factors"].numpy(), [c1, 0.85], rtol=1e-15)
    unit = np.array([2.0, -1.0]) / math.sqrt(5.0)
    expected = np.array([2 / 3, 2 / 3]) + (c1 - 0.85) * unit
    np.testing.assert_allclose(c.numpy() @ J, expected, rtol=1e-14)
    assert diagnostics["pull_scale"] == 1.0


def test_tension_factor_formula():
    """Eq. 7: c = alpha / (1 + exp(-e delta + e)) + 1 - alpha; c(1) = 1 - alpha/2, limits."""
    delta = np.array([1.0, -np.inf, np.inf, 0.0])
    expected = [1 - ALPHA / 2, 1 - ALPHA, 1.0, ALPHA / (1 + math.exp(math.e)) + 1 - ALPHA]
    np.testing.assert_allclose(tension_factors(delta, ALPHA), expected, rtol=1e-15)


def test_window_statistic_uses_the_ratio_of_consecutive_window_means():
    """Norms 1, 1, 2 with W = 2: zeta = 1 after step 2, 1.5 after step 3: delta = 1.5 + 0."""
    method = deconflict.Tensioner(window=2)
    for scale in (1.0, 1.0, 2.0):
        J = np.array([[scale, 0.0], [0.0, 1.0]])
        _, diagnostics = method.weights_with_diagnostics(J @ J.T, losses=[1.0, 1.0])
    np.testing.assert_allclose(diagnostics["delta"].numpy(), [1.5, 1.0], rtol=1e-15)


@pytest.mark.parametrize("base", ["central", "min_norm"])
def test_feasible_constraint_never_conflicts(base):
    rng = np.random.default_rng(0)
    method = deconflict.Tensioner(base=base, window=3)
    for _ in range(60):
        J = rng.standard_normal((3, 4)) * 1e-2  # small gradients: unit tensions dominate
        losses = np.exp(rng.standard_normal(3))
        D = update(method, J, losses=losses)
        assert_non_conflicting(J, D)


def test_golden_reference_constraint():
    """The authors' correction, by hand. g1 = (0.01, 0), g2 = (0, 0.01), losses (10, 1), W = 2.

    v = (0.005, 0.005); U = (c_1 - c_2)(1, -1)/sqrt 2 with c_1 - c_2 = 0.13143 (as in the golden
    tension step), so v_n = (0.0979, -0.0879) conflicts with g2 (checked second). Correction:
    w = unit(v_n - (v_n . u2) u2) = (1, 0); v_n - g2 = 0.0979 (1, -1) makes 135 degrees with g2,
    so a = 45 degrees, tan a = 1, and v_n <- tan(a) |g2| w = (0.01, 0): orthogonal to g2.
    The default 'feasible' constraint instead scales U back until g2 . v_n = 0 exactly.
    """
    J = np.array([[0.01, 0.0], [0.0, 0.01]])
    reference = deconflict.Tensioner(alpha=ALPHA, window=2, constraint="reference")
    feasible = deconflict.Tensioner(alpha=ALPHA, window=2)
    for _ in range(2):
        reference.weights(J @ J.T, losses=[10.0, 1.0])
        feasible.weights(J @ J.T, losses=[10.0, 1.0])
    D = reference.weights(J @ J.T, losses=[10.0, 1.0]).numpy() @ J
    np.testing.assert_allclose(D, [0.01, 0.0], rtol=1e-12, atol=1e-17)
    D = feasible.weights(J @ J.T, losses=[10.0, 1.0]).numpy() @ J
    assert abs(D[1]) < 1e-17 and D[0] > 0.005


def test_checkpoint_resume_reproduces_an_uninterrupted_run_exactly():
    rng = np.random.default_rng(4)
    inputs = [(rng.standard_normal((3, 5)), np.exp(rng.standard_normal(3))) for _ in range(40)]
    uninterrupted = deconflict.Tensioner(window=5)
    expected = [uninterrupted.weights(J @ J.T, losses=L) for J, L in inputs]

    first = deconflict.Tensioner(window=5)
    outputs = [first.weights(J @ J.T, losses=L) for J, L in inputs[:17]]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = deconflict.Tensioner(window=5)
    resumed.load_state_dict(torch.load(buffer))
    outputs += [resumed.weights(J @ J.T, losses=L) for J, L in inputs[17:]]
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_needs_losses_and_a_fixed_task_count():
    method = deconflict.Tensioner()
    with pytest.raises(deconflict.InvalidOptionError, match="needs the losses"):
        method.weights(np.eye(2))
    method.weights(np.eye(2), losses=[1.0, 1.0])
    with pytest.raises(deconflict.ShapeError, match="reset"):
        method.weights(np.eye(3), losses=[1.0, 1.0, 1.0])
    method.reset()
    method.weights(np.eye(3), losses=[1.0, 1.0, 1.0])


def test_options_are_validated():
    with pytest.raises(deconflict.InvalidOptionError, match="alpha"):
        deconflict.Tensioner(alpha=1.5)
    with pytest.raises(deconflict.InvalidOptionError, match="window"):
        deconflict.Tensioner(window=0)
    with pytest.raises(deconflict.InvalidOptionError, match="base"):
        deconflict.Tensioner(base="bisector")
    with pytest.raises(deconflict.InvalidOptionError, match="min_loss"):
        deconflict.Tensioner(min_loss=0.0)


def test_non_positive_losses_are_clamped_for_the_logarithm():
    J = np.eye(2)
    method = deconflict.Tensioner(window=1)
    method.weights(J, losses=[-5.0, 0.0])
    _, diagnostics = method.weights_with_diagnostics(J, losses=[-5.0, 0.0])
    np.testing.assert_allclose(diagnostics["delta"].numpy(), [1.0 - 12.0, 1.0 - 12.0])
