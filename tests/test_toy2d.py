"""The 2-D toy problem: closed-form gradients against autograd, Pareto geometry."""

from __future__ import annotations

import numpy as np
import torch

import deconflict
from deconflict.experiments.toy2d import LOWER, pareto_distance, toy_problem


def torch_toy_losses(theta: torch.Tensor) -> torch.Tensor:
    """EXPERIMENTS.md Section 1, transcribed separately for autograd."""
    x1, x2 = theta[..., 0], theta[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=LOWER).log() + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c1 = torch.clamp(torch.tanh(0.5 * x2), min=0)
    c2 = torch.clamp(torch.tanh(-0.5 * x2), min=0)
    return torch.stack([c1 * f1 + c2 * g1, c1 * f2 + c2 * g2], dim=-1)


def test_closed_form_matches_autograd():
    points = np.random.default_rng(0).uniform(-11, 11, size=(2000, 2))
    losses, jacobians = toy_problem(points)
    theta = torch.tensor(points, requires_grad=True)
    expected = torch_toy_losses(theta)
    np.testing.assert_allclose(losses, expected.detach().numpy(), rtol=1e-13, atol=1e-12)
    for task in range(2):
        grad = torch.autograd.grad(expected[:, task].sum(), theta, retain_graph=True)[0]
        np.testing.assert_allclose(jacobians[:, task], grad.numpy(), rtol=1e-11, atol=1e-11)


def test_pareto_distance():
    points = np.array([[0.0, -8.3552], [10.0, -8.3552], [0.0, 0.0], [-10.0, -4.3552]])
    np.testing.assert_allclose(pareto_distance(points), [0.0, 3.0, 8.3552, 5.0], rtol=1e-12)


def test_pareto_set_is_pareto_stationary():
    """On the segment, 0 is (nearly) in the convex hull of the two gradients."""
    for x1 in (-6.0, -2.0, 0.0, 3.0, 6.0):
        _, J = toy_problem(np.array([x1, -8.3552]))
        D = deconflict.aggregate(torch.from_numpy(J), deconflict.MGDA()).numpy()
        assert np.linalg.norm(D) < 1e-3 * np.linalg.norm(J, axis=1).max()
