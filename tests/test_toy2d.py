"""The 2-D toy problem: closed-form gradients against autograd (x2 = 0 included), Pareto
geometry, the CAGrad paper's start points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deconflict
from deconflict.cli import main
from deconflict.experiments.problems import get_problem
from deconflict.experiments.toy2d import (
    CODE_START_POINTS,
    LOWER,
    PAPER_START_POINTS,
    optimize,
    pareto_distance,
    toy_problem,
)

EPS = np.finfo(np.float64).eps


def torch_toy_losses(theta: torch.Tensor) -> torch.Tensor:
    """The formula as the authors' PyTorch code writes it (torch.clamp), for autograd."""
    x1, x2 = theta[..., 0], theta[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=LOWER).log() + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c1 = torch.clamp(torch.tanh(0.5 * x2), min=0)
    c2 = torch.clamp(torch.tanh(-0.5 * x2), min=0)
    return torch.stack([c1 * f1 + c2 * g1, c1 * f2 + c2 * g2], dim=-1)


def autograd_jacobians(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    theta = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    losses = torch_toy_losses(theta)
    rows = [torch.autograd.grad(losses[..., t].sum(), theta, retain_graph=True)[0]
            for t in range(2)]
    return losses.detach().numpy(), torch.stack(rows, dim=-2).numpy()


def gradient_tolerance(points: np.ndarray) -> np.ndarray:
    """A bound on the rounding difference of two float64 evaluations of the same gradient.

    Each term is a product of a few (< 16) rounded operations on values of size at most
    B = 1 + |f| + |g| (the clamps' factors are at most 1), hence 64 eps B; the log's derivative
    1 / a adds the rounding of a itself (about 8 eps (|x1| + 8), a sum of terms of that size)
    amplified by 1 / a^2. Per point, broadcast over the Jacobian's entries.
    """
    x1, x2 = points[..., 0], points[..., 1]
    th = np.tanh(x2)
    a = np.minimum(np.abs(-0.5 * x1 - 3.5 + th), np.abs(-0.5 * x1 + 3.5 - th))
    a = np.maximum(a, LOWER)
    size = 1 + np.abs(np.log(a)) + 6 + np.abs(x1) ** 2 + np.abs(x2 + 8) ** 2
    bound = 64 * EPS * size + 8 * EPS * (np.abs(x1) + 8) / a ** 2
    return bound[..., None, None]


def assert_matches_autograd(points: np.ndarray) -> None:
    losses, jacobians = toy_problem(points)
    expected_losses, expected = autograd_jacobians(points)
    tolerance = gradient_tolerance(points)
    loss_error = np.abs(losses - expected_losses)
    assert (loss_error <= tolerance[..., 0]).all(), (points, loss_error)
    error = np.abs(jacobians - expected)
    assert (error <= tolerance).all(), (points[(error > tolerance).any(axis=(-2, -1))], error.max())


def test_closed_form_matches_autograd():
    points = np.random.default_rng(0).uniform(-11, 11, size=(2000, 2))
    assert_matches_autograd(points)


def test_closed_form_matches_autograd_where_the_clamps_switch():
    """On x2 = 0 (tanh(x2 / 2) = 0: both c1 and c2 at their clamp) the gradient is autograd's,
    not zero: there dL_t/dx2 = (f_t - g_t) / 2."""
    x1 = np.linspace(-11, 11, 45)
    points = np.stack([x1, np.zeros_like(x1)], axis=-1)
    assert_matches_autograd(points)
    assert_matches_autograd(np.array([[0.0, -0.0], [0.0, 5e-324], [0.0, -5e-324]]))
    _, J = toy_problem(np.array([0.0, 0.0]))
    f1, f2 = np.log(3.5) + 6, np.log(3.5) + 6
    g1 = g2 = (49 + 6.4) / 10 - 20
    np.testing.assert_allclose(J[:, 1], [(f1 - g1) / 2, (f2 - g2) / 2], rtol=16 * EPS)


@given(st.floats(-11, 11), st.one_of(st.floats(-11, 11), st.sampled_from([0.0, -0.0]),
                                     st.floats(-1e-12, 1e-12)))
def test_closed_form_matches_autograd_fuzzed(x1, x2):
    assert_matches_autograd(np.array([[x1, x2]]))


def test_every_method_leaves_the_origin():
    """From the CAGrad paper's start (0, 0), where both losses are 0, every method moves
    (before the fix the closed-form gradient was 0 there, so none did); a method whose default
    divides by the losses, or needs more than two tasks, says so instead."""
    refused = {
        "mgda_ub": (deconflict.InvalidOptionError, "not positive"),  # default normalizer 'loss+'
        "geometric_mean": (deconflict.InvalidOptionError, "needs positive losses"),  # G/(T L_i)
        "krum": (deconflict.ShapeError, "at least n_byzantine \\+ 3"),  # a robust selection
        "cosmos": (deconflict.InvalidOptionError, "undefined when every loss is 0"),  # cos(r, L)
        "moco": (deconflict.InvalidOptionError, "needs positive losses"),  # L_i g_i / ||g_i||
    }
    for name in ("log_losses", "mgda_log", "cagrad_log", "imtl_g_log", "si_ls"):  # log L_i
        refused[name] = (deconflict.InvalidOptionError, "needs positive losses")
    # PBI's distance penalty is not smooth on its preference ray, where the origin lies (equal
    # losses): the iterates leave it, then chatter across the ray; its first step still moves.
    chatters = {"pbi"}
    for name in deconflict.available():
        if name in refused:
            error, message = refused[name]
            with pytest.raises(error, match=message):
                optimize([deconflict.get(name)], [(0.0, 0.0)], 20)
            continue
        if name in chatters:
            first = optimize([deconflict.get(name)], [(0.0, 0.0)], 1)[0, -1]
            assert np.linalg.norm(first) > 1e-4, name  # one Adam step of lr 1e-3
            continue
        final = optimize([deconflict.get(name)], [(0.0, 0.0)], 20)[0, -1]
        # 20 Adam steps of lr 1e-3 move about 0.02 along a steady gradient.
        assert np.linalg.norm(final) > 1e-2, name


def test_start_point_sets():
    assert PAPER_START_POINTS == ((-8.5, 7.5), (-8.5, -5.0), (0.0, 0.0), (9.0, 9.0),
                                  (10.0, -8.0))
    assert set(CODE_START_POINTS) < set(PAPER_START_POINTS) and len(CODE_START_POINTS) == 3
    problem = get_problem("toy2d")
    assert problem.resolve_config()["starts"] == [list(p) for p in CODE_START_POINTS]
    assert problem.resolve_config({"starts": "paper"})["starts"] == [
        list(p) for p in PAPER_START_POINTS]
    assert problem.resolve_config({"starts": "[[0, 0], [9, -1.5]]"})["starts"] == [
        [0.0, 0.0], [9.0, -1.5]]
    assert problem.resolve_config({"starts": [(1, 2)]})["starts"] == [[1.0, 2.0]]
    for bad in ("[[0, 0, 1]]", "[]", "[[0, nan]]", "origin", "[[0, 'a']]", "5"):
        with pytest.raises(deconflict.InvalidOptionError, match="starts="):
            problem.resolve_config({"starts": bad})


def test_set_starts_from_the_command_line(tmp_path):
    """`--set starts=[[0,0]]` trains from the origin, records the parsed points, and moves."""
    assert main(["run", "toy2d", "--method", "mean", "--smoke", "--quiet", "--set",
                 "starts=[[0,0]]", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.rglob("seed0-*.json")).read_text())
    assert record["config"]["starts"] == [[0.0, 0.0]]
    (final,) = record["statistics"]["final_points"]
    assert np.linalg.norm(final) > 0.04  # 50 steps of about lr = 1e-3 each


def test_pareto_distance():
    points = np.array([[0.0, -8.3552], [10.0, -8.3552], [0.0, 0.0], [-10.0, -4.3552]])
    np.testing.assert_allclose(pareto_distance(points), [0.0, 3.0, 8.3552, 5.0], rtol=1e-12)


def test_pareto_set_is_pareto_stationary():
    """On the segment, 0 is (nearly) in the convex hull of the two gradients."""
    for x1 in (-6.0, -2.0, 0.0, 3.0, 6.0):
        _, J = toy_problem(np.array([x1, -8.3552]))
        D = deconflict.aggregate(torch.from_numpy(J), deconflict.MGDA()).numpy()
        assert np.linalg.norm(D) < 1e-3 * np.linalg.norm(J, axis=1).max()
