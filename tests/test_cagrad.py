"""CAGrad and CAGrad-Fast: special cases, rescale options, golden values, Eq. 4."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from properties import (
    GOLDEN_RTOL,
    assert_close_relative,
    assert_no_conflict,
    combination_rtol,
    conflict_tolerances,
    update,
)
from strategies import build_jacobian, build_stationary_jacobian, jacobians

import deconflict
from deconflict.methods.cagrad_fast import subsampling_matrix


@given(J=jacobians())
def test_c_zero_gives_the_mean_gradient(J):
    """D = J^T (1/T): two float64 evaluations of that sum differ by at most
    ``combination_rtol`` (Higham's gamma_T on sum_i |g_i|), not by a fixed fraction of D,
    which can be tiny when the rows cancel."""
    D, mean = update(deconflict.CAGrad(c=0.0, rescale=0), J), J.mean(axis=0)
    assert np.linalg.norm(D - mean) <= combination_rtol(J, mean) * np.linalg.norm(mean)


def test_golden_orthogonal_tasks():
    """g1 = (1, 0), g2 = (0, 1): w* = (1/2, 1/2), g_w = g0 = (1/2, 1/2), so
    D = g0 + c |g0| g0/|g0| = (1 + c) g0 = (3/4, 3/4) for c = 1/2 (rescale 0);
    rescale 1 divides by 1 + c^2 = 5/4: (3/5, 3/5); rescale 2 by 1 + c = 3/2: (1/2, 1/2)."""
    J = np.eye(2)
    np.testing.assert_allclose(update(deconflict.CAGrad(0.5, rescale=0), J), [0.75, 0.75],
                               rtol=1e-14)
    np.testing.assert_allclose(update(deconflict.CAGrad(0.5, rescale=1), J), [0.6, 0.6],
                               rtol=1e-14)
    np.testing.assert_allclose(update(deconflict.CAGrad(0.5, rescale=2), J), [0.5, 0.5],
                               rtol=1e-14)


def test_golden_conflicting_pair_by_hand():
    """g1 = (1, 0), g2 = (-1, 0) (opposite): g0 = 0, the ball has radius 0, D = g0 = 0."""
    J = np.array([[1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_array_equal(update(deconflict.CAGrad(0.5), J), np.zeros(2))


@pytest.mark.parametrize(("rescale", "factor"), [(0, 1.5), (1, 1.5 / 1.25), (2, 1.0)])
def test_single_task(rescale, factor):
    """T = 1: D = (1 + c) g before rescaling."""
    g = np.array([[2.0, -1.0, 0.5]])
    np.testing.assert_allclose(update(deconflict.CAGrad(0.5, rescale=rescale), g), factor * g[0],
                               rtol=1e-14)


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread"), min_tasks=2, scales=False),
       c=st.sampled_from([0.2, 0.5, 0.8]))
def test_update_maximizes_the_worst_improvement_in_the_ball(J, c):
    """No point of the ball around g0 (radius c |g0|) does better on min_i g_i . D."""
    D = update(deconflict.CAGrad(c, rescale=0), J)
    g0 = J.mean(axis=0)
    radius = c * np.linalg.norm(g0)
    best = np.min(J @ D)
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((500, J.shape[1]))
    candidates = g0 + radius * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    assert np.max(np.min(candidates @ J.T, axis=1)) <= best + 1e-9 * np.max(np.abs(J)) ** 2


def test_options_are_validated():
    with pytest.raises(deconflict.InvalidOptionError, match="c must be"):
        deconflict.CAGrad(c=-0.1)
    with pytest.raises(deconflict.InvalidOptionError, match="c must be"):
        deconflict.CAGrad(c=math.nan)
    with pytest.raises(deconflict.InvalidOptionError, match="rescale"):
        deconflict.CAGrad(rescale=3)
    with pytest.raises(deconflict.InvalidOptionError, match="num_sampled"):
        deconflict.CAGradFast(num_sampled=0)


# --------------------------------------------------------------------------------- CAGrad-Fast
@given(J=jacobians(min_tasks=2, scales=False))
def test_fast_with_every_task_sampled_is_cagrad(J):
    fast = deconflict.CAGradFast(num_sampled=J.shape[0], seed=0)
    assert_close_relative(update(fast, J), update(deconflict.CAGrad(), J), 1e-9,
                          atol=1e-12 * np.abs(J).sum())


def test_fast_is_cagrad_on_the_sampled_tasks_plus_the_mean_of_the_rest():
    """Eq. 4 by hand: T = 4, S = {1, 3}: the vectors are g1, g3 and h = (g0 + g2) / 2, and the
    ball is still centred on the mean of all four, g0 = (1/4) sum g = (1/2 g1 + 1/2 g3 ... )."""
    J = build_jacobian("conflicting", 4, 4, 6, 0.0)
    A = subsampling_matrix(4, np.array([3, 1]))
    np.testing.assert_array_equal(A, [[0, 1, 0, 0], [0, 0, 0, 1], [0.5, 0, 0.5, 0]])
    reduced = A @ J
    # g0 = (g1 + g3 + 2 h) / 4 in terms of the rows of A J.
    anchor = np.array([0.25, 0.25, 0.5])
    from deconflict.methods.cagrad import cagrad_weights

    weights, _ = cagrad_weights(reduced @ reduced.T, anchor, 0.5, 1)
    expected = weights @ reduced
    fast = deconflict.CAGradFast(c=0.5)
    c, _ = fast.weights_with_diagnostics(torch.from_numpy(reduced @ reduced.T),
                                         combinations=torch.from_numpy(A))
    np.testing.assert_allclose(c.numpy() @ J, expected, rtol=1e-12)


def test_fast_full_gramian_path_equals_combination_path_for_the_same_seed():
    J = build_jacobian("random", 1, 6, 9, 0.0)
    via_full = deconflict.CAGradFast(num_sampled=2, seed=7).weights(J @ J.T)
    method = deconflict.CAGradFast(num_sampled=2, seed=7)
    A = method.gradient_combinations(6)
    reduced = A @ J
    via_rows = method.weights(reduced @ reduced.T, combinations=A)
    torch.testing.assert_close(via_rows, via_full, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------ the degenerate case (issue 13)
def test_issue_degenerate_case_follows_eq3():
    """G = [[2, 0.3], [-1, -0.15]]: g2 = -g1 / 2, so (1/3) g1 + (2/3) g2 = 0 (strongly
    stationary) and the dual cone is {x : g1 . x = 0}. With c = 10, D = 0 is in the ball and
    attains the optimum 0 of Eq. 3; P(g0) = 0 too (g0 = g1 / 4 is orthogonal to that cone).
    The official guard returns g0 instead: G g0 = [1.0225, -0.51125], conflicting."""
    G = np.array([[2.0, 0.3], [-1.0, -0.15]])
    c, diagnostics = deconflict.CAGrad(c=10.0, rescale=0).weights_with_diagnostics(G @ G.T)
    assert diagnostics["stationary"]
    np.testing.assert_allclose(G @ (c.numpy() @ G), [0.0, 0.0], atol=1e-15)
    official = update(deconflict.CAGrad(c=10.0, rescale=0, degenerate="official"), G)
    np.testing.assert_allclose(G @ official, [1.0225, -0.51125], rtol=1e-14)


def test_degenerate_weakly_stationary_hull_improves_the_free_task():
    """g1 = (1, 0), g2 = (-1, 0), g3 = (1, 1): g1 + g2 = 0 but no strictly positive combination
    vanishes. The cone {x : J x >= 0} is {(0, t) : t >= 0}, g0 = (1/3, 1/3), and P(g0) = (0, 1/3)
    is in the ball for c >= 1 (distance 1/3 <= |g0| = 0.471): D = (0, 1/3), so J D = (0, 0, 1/3),
    the optimum 0 of Eq. 3 with task 3 improving. The official guard's g0 conflicts with g2."""
    J = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    for c in (1.0, 10.0):
        D = update(deconflict.CAGrad(c=c, rescale=0), J)
        np.testing.assert_allclose(D, [0.0, 1.0 / 3.0], rtol=1e-14, atol=1e-15)


STATIONARY_CASES = [(kind, seed) for kind in ("strong", "weak") for seed in range(24)]


@pytest.mark.parametrize(("kind", "seed"), STATIONARY_CASES)
def test_c_at_least_one_never_conflicts_when_the_hull_contains_zero(kind, seed):
    """48 Jacobians whose hull contains 0 (24 strongly, 24 strictly weakly stationary; T from 3
    to 6, every rank the class allows). For c >= 1 the ball contains D = 0, so Eq. 3's optimum
    is >= 0: no task may get worse (the official guard, D = g0, fails 39 of these 48). At a
    strongly stationary J the cone is J's null space and D = 0."""
    rng = np.random.default_rng(seed)
    tasks = int(rng.integers(3, 7))
    dim = int(rng.integers(1, 7))
    rank = int(rng.integers(1, min(dim, tasks - 1) + 1))
    J = build_stationary_jacobian(kind, seed, tasks, dim, rank)
    M = J @ J.T
    for c in (1.0, 2.0):
        for method in (deconflict.CAGrad(c=c, rescale=0),
                       deconflict.CAGradFast(c=c, rescale=0, num_sampled=tasks)):
            weights, diagnostics = method.weights_with_diagnostics(M)
            weights = weights.numpy()
            D = weights @ J
            assert_no_conflict(J, D, conflict_tolerances(J, weights))
            if kind == "strong" and diagnostics["stationary"]:
                # Zero up to the rounding of D = J^T c: gamma sum_k |c_k| ||g_k||.
                sigma = np.abs(weights) @ np.linalg.norm(J, axis=1)
                assert np.linalg.norm(D) <= (6 * tasks + 2 * dim + 8) * 2.3e-16 * sigma


@given(J=jacobians(), c=st.sampled_from([1.0, 1.5, 4.0]))
def test_c_at_least_one_never_conflicts(J, c):
    method = deconflict.CAGrad(c=c)
    weights = method.weights(J @ J.T).numpy()
    assert_no_conflict(J, weights @ J, conflict_tolerances(J, weights))


def test_fast_sampled_excludes_the_single_left_out_task():
    """K = 4, |S| = 3: A has rows e_0, e_2, e_3 and the mean of the rest, which is e_1 itself;
    ``sampled`` is {0, 2, 3}, not all four tasks."""
    J = build_jacobian("random", 2, 4, 5, 0.0)
    A = subsampling_matrix(4, np.array([3, 0, 2]))
    np.testing.assert_array_equal(A[-1], [0, 1, 0, 0])
    reduced = A @ J
    fast = deconflict.CAGradFast(num_sampled=3, seed=0)
    _, diagnostics = fast.weights_with_diagnostics(torch.from_numpy(reduced @ reduced.T),
                                                   combinations=torch.from_numpy(A))
    assert diagnostics["sampled"].tolist() == [0, 2, 3]
    for num_sampled in (1, 3, 4):
        fast = deconflict.CAGradFast(num_sampled=num_sampled, seed=1)
        _, diagnostics = fast.weights_with_diagnostics(J @ J.T)
        assert len(diagnostics["sampled"]) == num_sampled


def test_degenerate_option_is_validated():
    with pytest.raises(deconflict.InvalidOptionError, match="degenerate"):
        deconflict.CAGrad(degenerate="zero")


def test_small_task_gets_the_ball_when_norms_span_1e12():
    """g1 = (1, 0), g2 = (0, e), e = 1e-12, c = 1/2, rescale 0: g2 improves least in the whole
    ball, so CAGrad spends all of r = |g0| / 2 on it: D = g0 + r (0, 1), g0 = (1/2, e/2), and
    g2 . D = e (e/2 + r) (the mean gradient gives only e^2 / 2). Before issue 13 the dual
    treated ||g_w|| = e as zero and returned the mean gradient as 'stationary'."""
    e = 1e-12
    J = np.array([[1.0, 0.0], [0.0, e]])
    c, diagnostics = deconflict.CAGrad(c=0.5, rescale=0).weights_with_diagnostics(J @ J.T)
    assert not diagnostics["stationary"]
    radius = 0.5 * math.sqrt(0.25 + e * e / 4)
    np.testing.assert_allclose(c.numpy() @ J, [0.5, e / 2 + radius], rtol=GOLDEN_RTOL)
