"""PCD (Priority-Constrained Descent, TMLR 2026; docs/methods.md#pcd).

Hand-checked 2- and 3-task cases (constraints active, inactive, infeasible), the moving average,
the KKT conditions of the QP checked on J itself, infeasibility against a linear program,
parity with TorchJD 0.18's PCD over sequences of steps, and the state round trip.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from properties import GOLDEN_RTOL, assert_close_relative, solve_rtol, update
from scipy.optimize import linprog
from strategies import build_jacobian

import deconflict
from deconflict.methods.pcd import PCD, kkt_residual


def quiet(method: PCD, M: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deconflict.ZeroUpdateWarning)
        weights, diagnostics = method.weights_with_diagnostics(M)
    return weights.numpy(), diagnostics


def test_two_tasks_inactive_constraint_follows_the_primary_gradient():
    # g~_1 = (1, 0), g~_2 = (1, 1)/sqrt 2: g~_2 . g~_1 = 0.707 >= tau = 0.5, so d~ = g~_1 and
    # the update is g_1 itself: c = (1, 0).
    J = np.array([[2.0, 0.0], [3.0, 3.0]])
    c, diagnostics = quiet(PCD(tau=0.5, eps=0.0), J @ J.T)
    assert_close_relative(c, np.array([1.0, 0.0]), GOLDEN_RTOL)
    assert diagnostics["feasible"] and diagnostics["solved"]


def test_two_tasks_active_constraint():
    # g~_1 = (1, 0), g~_2 = (0, 1), tau = 0.5: K_s = 1, b = 0.5, mu = 0.5; d~ = (1, 0.5),
    # ||d~|| = sqrt(1.25); c = s w ||g_1|| / ||d~|| = (1/2, 0.5/3) 2 / sqrt(1.25).
    J = np.array([[2.0, 0.0], [0.0, 3.0]])
    method = PCD(tau=0.5, eps=0.0)
    c, diagnostics = quiet(method, J @ J.T)
    assert_close_relative(c, np.array([1.0, 1.0 / 3.0]) / math.sqrt(1.25), GOLDEN_RTOL)
    assert_close_relative(diagnostics["multipliers"].numpy(), np.array([0.5]), GOLDEN_RTOL)
    D = J.T @ c
    assert math.isclose(float(np.linalg.norm(D)), 2.0, rel_tol=GOLDEN_RTOL)  # ||g_1||
    # The secondary task gets exactly tau of its normalized progress: g~_2 . d~ = 0.5, with
    # g~_2 = e2 and d~ = D sqrt(1.25) / 2.
    assert math.isclose(float(D[1]) * math.sqrt(1.25) / 2.0, 0.5, rel_tol=GOLDEN_RTOL)


def test_three_tasks_one_active_one_inactive():
    # g~_1 = e1, g~_2 = e2 (active, mu = 0.5), g~_3 = (e1 + e3)/sqrt 2: g~_3 . d~ = 0.707 >= 0.5
    # at d~ = (1, 0.5, 0), so inactive. c = (1, 0.5/2, 0) / sqrt(1.25).
    J = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 1.0]])
    c, diagnostics = quiet(PCD(tau=0.5, eps=0.0), J @ J.T)
    assert_close_relative(c, np.array([1.0, 0.25, 0.0]) / math.sqrt(1.25), GOLDEN_RTOL)
    assert diagnostics["feasible"]


def test_three_tasks_infeasible_falls_back_to_the_primary_gradient():
    # g_2 = -g_3 (orthogonal to g_1): d_y >= 0.1 and -d_y >= 0.1 cannot both hold.
    J = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    c, diagnostics = quiet(PCD(tau=0.1, eps=0.0), J @ J.T)
    assert c.tolist() == [1.0, 0.0, 0.0]
    assert diagnostics["feasible"] is False
    # At tau = 0 the same constraints are feasible (d_y = 0): the update is g_1 again.
    c, diagnostics = quiet(PCD(tau=0.0, eps=0.0), J @ J.T)
    assert diagnostics["feasible"] and c[0] == pytest.approx(1.0, rel=GOLDEN_RTOL)


def test_zero_primary_gradient_and_cancelled_direction_give_zero():
    J = np.array([[0.0, 0.0], [1.0, 2.0]])
    assert quiet(PCD(), J @ J.T)[0].tolist() == [0.0, 0.0]
    # tau = 0, g_2 = -g_1: d~ = projection of g~_1 on {g~_2 . d >= 0} = 0 (strongly stationary).
    J = np.array([[1.0, 0.0], [-1.0, 0.0]])
    c, diagnostics = quiet(PCD(tau=0.0, eps=0.0), J @ J.T)
    assert c.tolist() == [0.0, 0.0] and diagnostics["zero_update"] == "stationary"


def test_per_task_tau_list():
    # As the active 2-task case, with the list form; a list of the wrong length is refused.
    J = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    c, _ = quiet(PCD(tau=[0.5, 0.3], eps=0.0), J @ J.T)
    assert_close_relative(c, np.array([1.0, 1.0 / 3.0, 0.0]) / math.sqrt(1.25), GOLDEN_RTOL)
    with pytest.raises(deconflict.InvalidOptionError):
        PCD(tau=[0.5]).weights(J @ J.T)
    with pytest.raises(deconflict.InvalidOptionError):
        PCD(tau=1.5)
    with pytest.raises(deconflict.InvalidOptionError):
        PCD(beta=1.0)


def test_moving_average_is_bias_corrected():
    # beta = 0.5: step 1 vhat = n1; step 2 v = 0.25 n1 + 0.5 n2, vhat = v / 0.75.
    method = PCD(beta=0.5, eps=0.0)
    quiet(method, np.diag([4.0, 1.0]))
    assert_close_relative(quiet(method, np.diag([4.0, 1.0]))[1]["scales"].numpy(),
                          np.array([0.5, 1.0]), GOLDEN_RTOL)
    method.reset()
    quiet(method, np.diag([4.0, 1.0]))
    _, diagnostics = quiet(method, np.diag([16.0, 4.0]))
    vhat = (0.25 * np.array([4.0, 1.0]) + 0.5 * np.array([16.0, 4.0])) / 0.75
    assert_close_relative(diagnostics["scales"].numpy(), 1.0 / np.sqrt(vhat), GOLDEN_RTOL)
    assert method.steps == 2
    with pytest.raises(deconflict.ShapeError):
        method.weights(np.eye(3))


@pytest.mark.parametrize("seed", range(40))
def test_kkt_conditions_on_the_jacobian(seed):
    """The KKT conditions of the convex QP (necessary and sufficient), checked on J itself:
    d~ - g~_1 = sum_j mu_j g~_j with mu >= 0, g~_j . d~ >= tau_j ||g~_j||^2, complementarity.
    Tolerance: the residual check's 1e-9 (the NNLS solution's error is solve_rtol(cond, T))."""
    rng = np.random.default_rng(seed)
    T = int(rng.integers(2, 7))
    n = int(rng.integers(T, T + 4))
    taus = rng.uniform(0.0, 0.6, size=T - 1)
    J = rng.normal(size=(T, n)) * np.exp(rng.normal(size=(T, 1)))
    method = PCD(tau=tuple(taus.tolist()))
    c, diagnostics = quiet(method, J @ J.T)
    assert diagnostics["feasible"] and diagnostics["solved"]
    s = diagnostics["scales"].numpy()
    mu = diagnostics["multipliers"].numpy()
    G = J * s[:, None]
    d = G[0] + mu @ G[1:]
    progress = G[1:] @ d
    need = taus * np.sum(G[1:] ** 2, axis=1)
    size = np.abs(G[1:]) @ np.abs(d) + need
    assert (mu >= 0.0).all()
    assert (progress - need >= -1e-9 * size).all()
    assert (np.abs(mu * (progress - need)) <= 1e-9 * size * np.maximum(mu, 1.0)).all()
    # The update is d~ rescaled to ||g_1||.
    D = J.T @ c
    assert_close_relative(D, d * np.linalg.norm(J[0]) / np.linalg.norm(d), 1e-10)
    assert kkt_residual(J @ J.T, s * np.append(1.0, mu), s, taus) <= 1e-9


@pytest.mark.parametrize("seed", range(30))
def test_infeasibility_matches_a_linear_program(seed):
    # Rank-deficient J (n < T - 1): feasibility of {d : A d >= b} decided by HiGHS.
    rng = np.random.default_rng(seed)
    T = int(rng.integers(3, 7))
    n = int(rng.integers(1, T - 1))
    tau = float(rng.choice([0.05, 0.3]))
    J = rng.normal(size=(T, n))
    c, diagnostics = quiet(PCD(tau=tau), J @ J.T)
    s = diagnostics["scales"].numpy()
    G = J * s[:, None]
    lp = linprog(np.zeros(n), A_ub=-G[1:], b_ub=-tau * np.sum(G[1:] ** 2, axis=1),
                 bounds=[(None, None)] * n, method="highs")
    assert diagnostics["feasible"] == (lp.status == 0)
    if not diagnostics["feasible"]:
        assert c.tolist() == [1.0] + [0.0] * (T - 1)


@pytest.mark.parametrize("tau", [0.0, 0.02, 0.3, 0.9])
def test_parity_with_torchjd_over_steps(tau):
    """Same EMA, same QP: the updates agree to solve_rtol(cond, T) of the normalized Gramian
    (TorchJD: a dual active-set method; here NNLS), 8 steps of 25 random sequences."""
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(int(tau * 100))
    worst = 0.0
    for _ in range(25):
        T = int(rng.integers(2, 6))
        n = int(rng.integers(T + 1, T + 5))
        ours, theirs = PCD(tau=tau, beta=0.9), torchjd_aggregation.PCD(tau=tau, beta=0.9)
        scale = np.exp(rng.normal(size=(T, 1)))
        for _ in range(8):
            J = rng.normal(size=(T, n)) * scale
            c, diagnostics = quiet(ours, J @ J.T)
            expected = theirs(torch.from_numpy(J)).numpy()
            s = diagnostics["scales"].numpy()
            K = (J * s[:, None]) @ (J * s[:, None]).T
            tol = solve_rtol(float(np.linalg.cond(K)), T)
            difference = float(np.linalg.norm(J.T @ c - expected) / np.linalg.norm(expected))
            assert difference <= tol
            worst = max(worst, difference)
    print(f"PCD parity tau={tau}: max relative difference {worst:.2e}")


def test_state_round_trip_is_exact():
    rng = np.random.default_rng(3)
    Js = [rng.normal(size=(3, 5)) for _ in range(6)]
    method = PCD(beta=0.7)
    for J in Js[:3]:
        quiet(method, J @ J.T)
    saved = method.state_dict()
    restored = PCD(beta=0.7)
    restored.load_state_dict(saved)
    for J in Js[3:]:
        assert quiet(method, J @ J.T)[0].tolist() == quiet(restored, J @ J.T)[0].tolist()
    assert restored.steps == method.steps == 6
    method.reset()
    assert method.second_moment is None and method.steps == 0


def test_update_through_the_api_is_g1_scaled():
    # The update's norm is ||g_1|| whenever d~ is not negligible.
    J = np.array([[3.0, 1.0, 0.0], [-1.0, 2.0, 0.5], [0.0, -1.0, 2.0]])
    D = update(PCD(tau=0.3), J)
    assert math.isclose(float(np.linalg.norm(D)), float(np.linalg.norm(J[0])), rel_tol=1e-12)


def test_scale_free_at_eps_zero():
    """At eps = 0, g~_i = g_i / sqrt(vhat_i) does not change when a row is multiplied by the
    same constant at every step: a secondary row leaves D unchanged, the whole J scales D."""
    rng = np.random.default_rng(7)
    Js = [rng.normal(size=(3, 4)) for _ in range(4)]
    row = np.array([[1.0], [1e6], [1.0]])
    plain, scaled_row, scaled_all = PCD(tau=0.4, eps=0.0), PCD(tau=0.4, eps=0.0), \
        PCD(tau=0.4, eps=0.0)
    for J in Js:
        units = J / np.linalg.norm(J, axis=1, keepdims=True)
        tol = solve_rtol(float(np.linalg.cond(units @ units.T)), 3)
        D = update(plain, J)
        assert_close_relative(update(scaled_row, J * row), D, tol)
        assert_close_relative(update(scaled_all, 1e-9 * J), 1e-9 * D, tol)


@pytest.mark.parametrize("log_scale", [0.0, -20.0, 20.0])
@pytest.mark.parametrize("seed", range(12))
def test_zero_secondary_gradients_agree_with_torchjd(seed, log_scale):
    """A zero secondary gradient (constraint 0 >= 0) is left out of the QP: before that fix its
    rounding-noise column sent NNLS to multipliers of 1e14. Parity with TorchJD at eps = 0
    (scale free, so every scale is comparable) within solve_rtol of the cosine matrix."""
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    J = build_jacobian("zero_row", seed, 6, 6, log_scale)
    c, diagnostics = quiet(PCD(tau=0.3, eps=0.0), J @ J.T)
    assert diagnostics["solved"]
    expected = torchjd_aggregation.PCD(tau=0.3, eps=0.0)(torch.from_numpy(J)).numpy()
    norms = np.linalg.norm(J, axis=1)
    live = norms > 0
    units = J[live] / norms[live, None]
    assert_close_relative(J.T @ c, expected, solve_rtol(float(np.linalg.cond(units @ units.T)), 6))
