"""Loss-weighting methods: UW, IMTL-L, DWA, RLW, FAMO, GradNorm (golden values and rules).

Adam's first step moves each value by lr * g / (|g| + 1e-8) = lr * sign(g) (to 1e-8 relative),
which the derivations below use.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import deconflict
from deconflict.methods import AfterStep

LR = 0.025


def weights(method, losses, gramian=None):
    return method.weights(gramian, losses=losses).numpy()


def test_uw_golden():
    """s = 0: weights 0.5 exp(0) = 1/2. Gradient 0.5 - 0.5 L = (-1/2, 1/4) for L = (2, 1/2), so
    Adam moves s to (+0.025, -0.025) and the next weights are 0.5 exp(-s)."""
    method = deconflict.UncertaintyWeighting()
    np.testing.assert_allclose(weights(method, [2.0, 0.5]), [0.5, 0.5], rtol=1e-15)
    np.testing.assert_allclose(weights(method, [2.0, 0.5]),
                               [0.5 * math.exp(-LR), 0.5 * math.exp(LR)], rtol=1e-7)


def test_uw_converges_to_half_inverse_losses():
    """At the stationary point exp(s) = L, so the weights approach 1 / (2 L)."""
    method = deconflict.UncertaintyWeighting(lr=0.05)
    for _ in range(3000):
        w = weights(method, [4.0, 0.25])
    np.testing.assert_allclose(w, [1 / 8, 2.0], rtol=1e-2)


def test_imtl_l_golden():
    """s = 0: weights exp(0) = 1. Gradient exp(s) L - 1 = (1, -1/2) for L = (2, 1/2): s moves to
    (-0.025, +0.025), the next weights are exp(s)."""
    method = deconflict.IMTLL()
    np.testing.assert_allclose(weights(method, [2.0, 0.5]), [1.0, 1.0], rtol=1e-15)
    np.testing.assert_allclose(weights(method, [2.0, 0.5]), [math.exp(-LR), math.exp(LR)],
                               rtol=1e-7)


def test_dwa_epoch_golden():
    """Two steps per epoch. Epochs 1-2: lambda = 1. Epoch means (1, 1) then (1/2, 1): w = (1/2, 1)
    and lambda = 2 (e^{1/4}, e^{1/2}) / (e^{1/4} + e^{1/2}): the faster-falling task 1 gets less."""
    method = deconflict.DWA(steps_per_epoch=2)
    for losses in ([1.0, 1.0], [1.0, 1.0], [0.5, 1.0], [0.5, 1.0]):
        np.testing.assert_array_equal(weights(method, losses), [1.0, 1.0])
    a, b = math.exp(0.25), math.exp(0.5)
    np.testing.assert_allclose(weights(method, [0.3, 0.3]), [2 * a / (a + b), 2 * b / (a + b)],
                               rtol=1e-14)


def test_dwa_explicit_epochs_and_window_mode():
    method = deconflict.DWA()
    weights(method, [1.0, 1.0])
    method.end_epoch()
    weights(method, [0.5, 1.0])
    method.end_epoch()
    a, b = math.exp(0.25), math.exp(0.5)
    np.testing.assert_allclose(weights(method, [1.0, 1.0]), [2 * a / (a + b), 2 * b / (a + b)],
                               rtol=1e-14)
    window = deconflict.DWA(mode="window", window=2)
    for losses in ([1.0, 1.0], [1.0, 1.0], [0.5, 1.0]):
        np.testing.assert_array_equal(weights(window, losses), [1.0, 1.0])
    # Windows: (1, 1), (1, 1) then (0.5, 1), (0.5, 1) -> ratios (1/2, 1), as above.
    weights(window, [0.5, 1.0])
    np.testing.assert_allclose(weights(window, [9.0, 9.0]), [2 * a / (a + b), 2 * b / (a + b)],
                               rtol=1e-14)


def test_rlw_weights_are_a_fresh_softmax_of_normals():
    method = deconflict.RLW(seed=3)
    draws = np.array([weights(method, [1.0, 1.0, 1.0]) for _ in range(4000)])
    np.testing.assert_allclose(draws.sum(axis=1), 1.0, rtol=1e-14)
    assert len({tuple(d) for d in draws}) == len(draws)  # fresh each step
    np.testing.assert_allclose(draws.mean(axis=0), [1 / 3] * 3, atol=0.01)
    # For two tasks lambda_1 = sigmoid(xi_1 - xi_2) with xi_1 - xi_2 ~ N(0, 2).
    pair = np.array([weights(method, [1.0, 1.0])[0] for _ in range(4000)])
    logits = np.log(pair / (1 - pair))
    assert logits.var() == pytest.approx(2.0, rel=0.1)


def test_famo_golden():
    """Step 1: z = (1/2, 1/2), l = L = (2, 1/2): c = (z/l) / sum(z/l) = (1/4, 1) / (5/4),
    i.e. (1/5, 4/5).
    After the step the losses are (1, 1/2): delta = (log 2, 0), z . delta = log(2)/2, gradient
    z (delta - z . delta) = (log(2)/4, -log(2)/4); Adam moves xi to (-0.025, +0.025) (the weight
    decay acts on xi = 0, i.e. not at all). Step 2 with L = (1, 1/2): z = softmax(xi),
    c proportional to z / L."""
    method = deconflict.FAMO()
    np.testing.assert_allclose(weights(method, [2.0, 0.5]), [0.2, 0.8], rtol=1e-7)
    method.after_step([1.0, 0.5])
    z = np.exp([-LR, LR]) / np.exp([-LR, LR]).sum()
    expected = (z / [1.0, 0.5]) / (z / [1.0, 0.5]).sum()
    np.testing.assert_allclose(weights(method, [1.0, 0.5]), expected, rtol=1e-7)


def test_famo_requires_after_step():
    method = deconflict.FAMO()
    weights(method, [1.0, 1.0])
    with pytest.raises(deconflict.InvalidOptionError, match="after_step"):
        weights(method, [1.0, 1.0])
    fresh = deconflict.FAMO()
    with pytest.raises(deconflict.InvalidOptionError, match="without a backward"):
        fresh.after_step([1.0, 1.0])


def test_gradnorm_golden():
    """Gradient norms nu = (1, 3) (Gramian diag (1, 9)), equal losses. Step 1 returns w = (1, 1);
    G = nu, mean 2, rates r = 1, targets 2: dL_grad/dw = sign(G - 2) nu = (-1, 3), Adam moves w to
    (1.025, 0.975), already summing to 2. The smaller-gradient task gains weight."""
    method = deconflict.GradNorm()
    M = np.diag([1.0, 9.0])
    np.testing.assert_array_equal(weights(method, [1.0, 1.0], M), [1.0, 1.0])
    np.testing.assert_allclose(weights(method, [1.0, 1.0], M), [1 + LR, 1 - LR], rtol=1e-7)


def test_gradnorm_keeps_weights_positive_and_summing_to_t():
    method = deconflict.GradNorm(lr=0.5)
    M = np.diag([1e-4, 100.0, 1.0])
    for step in range(50):
        w = weights(method, [1.0, 2.0 + step, 0.5], M)
        assert (w > 0).all()
        assert w.sum() == pytest.approx(3.0, rel=1e-12)


def test_loss_weighting_rejects_changed_task_counts():
    for method in (deconflict.UncertaintyWeighting(), deconflict.FAMO(), deconflict.GradNorm()):
        weights(method, [1.0, 1.0], np.eye(2))
        if isinstance(method, AfterStep):
            method.after_step([1.0, 1.0])
        with pytest.raises(deconflict.ShapeError, match="reset"):
            weights(method, [1.0, 1.0, 1.0], np.eye(3))


def test_rlw_matches_torch_softmax_of_the_seeded_draw():
    """RLW draws xi ~ N(0, I) in float64 from its generator and applies softmax."""
    xi = torch.randn(4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    np.testing.assert_allclose(weights(deconflict.RLW(seed=9), [1.0] * 4),
                               torch.softmax(xi, 0).numpy(), rtol=1e-15)
