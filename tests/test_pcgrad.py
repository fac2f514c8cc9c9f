"""PCGrad: the vector algorithm vs the Gramian form, golden values, seeding, state."""

from __future__ import annotations

import io

import numpy as np
import torch
from hypothesis import given
from properties import (
    GOLDEN_RTOL,
    assert_close_relative,
    assert_non_conflicting,
    rounding_scale,
    update,
)
from strategies import jacobians

import deconflict


def literal_pcgrad(J: np.ndarray, orders) -> np.ndarray:
    """Paper Algorithm 1 on vectors, with given partner orders (self excluded), summed."""
    result = np.zeros(J.shape[1])
    for i in range(J.shape[0]):
        g = J[i].copy()
        for j in orders[i]:
            dot = g @ J[j]
            if dot < 0 and J[j] @ J[j] > 0:
                g -= dot / (J[j] @ J[j]) * J[j]
        result += g
    return result


@given(J=jacobians(scales=False))
def test_gramian_form_equals_the_vector_algorithm(J):
    method = deconflict.PCGrad(seed=1)
    c, diagnostics = method.weights_with_diagnostics(J @ J.T)
    orders = diagnostics["orders"].numpy()
    for i, order in enumerate(orders):
        assert i not in order and sorted(order) == [j for j in range(len(orders)) if j != i]
    assert_close_relative(c.numpy() @ J, literal_pcgrad(J, orders), 1e-10,
                          atol=rounding_scale(J))


@given(J=jacobians(min_tasks=2, max_tasks=2))
def test_two_tasks_never_conflict(J):
    assert_non_conflicting(J, update(deconflict.PCGrad(), J))


def test_golden_two_tasks():
    """g1 = (1, 0), g2 = (-1, 1) conflict: g1 -> g1 - (-1/2) g2 = (1/2, 1/2),
    g2 -> g2 - (-1/1) g1 = (0, 1); the sum is (1/2, 3/2)."""
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(update(deconflict.PCGrad(), J), [0.5, 1.5], rtol=GOLDEN_RTOL)


def test_three_tasks_can_conflict_unlike_gradops():
    """The GradOPS motivation: with T = 3, PCGrad's update can still conflict."""
    found = 0
    rng = np.random.default_rng(0)
    for _ in range(300):
        J = rng.standard_normal((3, 3))
        D = update(deconflict.PCGrad(seed=0), J)
        if np.min(J @ D) < -1e-9 * np.linalg.norm(D):
            found += 1
            assert np.min(J @ update(deconflict.GradOPS(), J)) >= -1e-9
    assert found > 0


def test_seed_makes_orders_reproducible_and_state_resumes():
    J = np.random.default_rng(2).standard_normal((5, 7))
    M = torch.from_numpy(J @ J.T)
    a = deconflict.PCGrad(seed=3)
    first = [a.weights(M) for _ in range(3)]
    b = deconflict.PCGrad(seed=3)
    assert all(torch.equal(x, b.weights(M)) for x in first)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    expected = [a.weights(M) for _ in range(4)]
    c = deconflict.PCGrad(seed=99)
    buffer.seek(0)
    c.load_state_dict(torch.load(buffer))
    assert all(torch.equal(x, c.weights(M)) for x in expected)


def test_global_rng_when_unseeded():
    J = np.random.default_rng(2).standard_normal((5, 7))
    M = J @ J.T
    torch.manual_seed(5)
    a = deconflict.PCGrad().weights(M)
    torch.manual_seed(5)
    torch.testing.assert_close(deconflict.PCGrad().weights(M), a, rtol=0, atol=0)
