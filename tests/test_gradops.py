"""GradOPS: the paper's guarantees, a literal Gram-Schmidt reference, golden values, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from properties import (
    GOLDEN_RTOL,
    assert_close_relative,
    assert_non_conflicting,
    assert_strongly_non_conflicting,
    update,
)
from strategies import build_jacobian, jacobians

import deconflict
from deconflict.methods.gradops import gradops_weights

ALPHAS = st.sampled_from([-5.0, -3.0, -2.0, -1.0, 0.0, 0.5, 2.0, 5.0])


def retried(method: deconflict.GradOPS, J: np.ndarray) -> bool:
    """Whether the float64 post-check fired, on the Gramian ``aggregate`` itself builds."""
    _, diagnostics = method.weights_with_diagnostics(deconflict.gramian(torch.from_numpy(J)))
    return bool(diagnostics["retried"].any())


def order_tolerance(J: np.ndarray) -> float:
    """Perturbation bound for reordering: rounding of M (~eps) amplified by cond(K)."""
    M = J @ J.T
    live = np.diag(M) > 0
    n = np.sqrt(np.diag(M)[live])
    values = np.linalg.eigvalsh(M[np.ix_(live, live)] / np.outer(n, n))
    smallest = max(values[0], 1e-16 * values[-1]) if values.size else 1.0
    return 1e-9 + 1e2 * np.finfo(float).eps * values[-1] / smallest if values.size else 1e-9


def gram_schmidt_gradops(J: np.ndarray, alpha: float, dependence_tol: float = 1e-6):
    """GradOPS exactly as the paper states it (Algorithm 1, Eq. 1-5), on vectors.

    For each conflicting task, an orthonormal basis of the other gradients by modified
    Gram-Schmidt (twice, for accuracy), then g'_i = g_i minus its projections; a task whose
    remainder has sin^2 <= dependence_tol is dependent (g'_i = 0). Returns (D, g', min sin^2 margin
    to the dependence threshold, in log10) so callers can skip cases at the threshold.
    """
    T = J.shape[0]
    norms = np.linalg.norm(J, axis=1)
    M = J @ J.T
    modified, active, margins = [], [], [np.inf]
    for i in range(T):
        others = [j for j in range(T) if j != i]
        conflicting = norms[i] > 0 and any(M[i, j] < 0 for j in others)
        if norms[i] == 0:
            modified.append(np.zeros(J.shape[1]))
            continue
        if not conflicting:
            modified.append(J[i].copy())
            active.append(i)
            continue
        basis = []
        for j in others:
            u = J[j].copy()
            for _ in range(2):
                for b in basis:
                    u -= (u @ b) * b
            if np.linalg.norm(u) > 1e-9 * norms[j]:
                basis.append(u / np.linalg.norm(u))
        g = J[i].copy()
        for _ in range(2):
            for b in basis:
                g -= (g @ b) * b
        sin2 = (g @ g) / norms[i] ** 2
        margins.append(abs(math.log10(max(sin2, 1e-300) / dependence_tol)))
        if sin2 <= dependence_tol:
            modified.append(np.zeros(J.shape[1]))
        else:
            modified.append(g)
            active.append(i)
    G = np.sum(modified, axis=0)
    D = np.zeros(J.shape[1])
    if active:
        R = np.array([G @ J[k] / norms[k] for k in active])
        r = R / R.mean()
        w = r**alpha / np.mean(r**alpha)
        D = sum(w_k * modified[k] for w_k, k in zip(w, active, strict=True))
    return D, np.array(modified), min(margins)


# --------------------------------------------------------------------- the paper's guarantees
@given(J=jacobians(), alpha=ALPHAS)
def test_every_modified_gradient_is_non_conflicting(J, alpha):
    """Strong non-conflict: g'_i . g_j >= 0 for all i, j (paper Section 3.1)."""
    _, diagnostics = deconflict.GradOPS(alpha).weights_with_diagnostics(J @ J.T)
    assert_strongly_non_conflicting(J, diagnostics["projection_coefficients"].numpy())


@given(J=jacobians(), alpha=ALPHAS, gating=st.sampled_from(["per_task", "all"]))
def test_update_is_non_conflicting(J, alpha, gating):
    assert_non_conflicting(J, update(deconflict.GradOPS(alpha, gating=gating), J))


@given(J=jacobians(), alpha=ALPHAS, seed=st.integers(0, 2**16))
def test_invariant_to_task_order(J, alpha, seed):
    perm = np.random.default_rng(seed).permutation(J.shape[0])
    method = deconflict.GradOPS(alpha)
    # The algorithm is order-free; only where the float64 post-check fired can rounding (which
    # depends on the order) tip a task across its threshold. Such inputs are skipped.
    for order in (np.arange(J.shape[0]), perm):
        assume(not retried(method, J[order]))
    assert_close_relative(update(method, J[perm]), update(method, J), order_tolerance(J))


def test_order_invariance_holds_on_near_duplicates_away_from_thresholds():
    """Near-duplicate tasks (cosine 1 - 1e-9) make K ill-conditioned (~1e9): reordering then
    changes D by up to cond(K) * eps, no more; typically far less."""
    errors = []
    for seed in range(200):
        J = build_jacobian("near_duplicate", seed, 4, 8, 0.0)
        perm = np.random.default_rng(seed).permutation(4)
        assert not any(retried(deconflict.GradOPS(-5.0), J[o]) for o in (np.arange(4), perm))
        a, b = update(deconflict.GradOPS(-5.0), J[perm]), update(deconflict.GradOPS(-5.0), J)
        assert_close_relative(a, b, order_tolerance(J))
        errors.append(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
    assert np.median(errors) < 1e-7


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread", "zero_row", "duplicate",
                          "near_duplicate"), min_tasks=2, max_tasks=2))
def test_equals_pcgrad_at_two_tasks_and_alpha_zero(J):
    pcgrad = update(deconflict.PCGrad(), J)
    # Exact with the dependence threshold off (only exactly opposite gradients are dependent).
    exact = deconflict.GradOPS(0.0, dependence_tol=0.0)
    assert_close_relative(update(exact, J), pcgrad, 1e-9)
    # With the default threshold, gradients within ~0.06 degrees of opposite are dependent.
    cos = (J[0] @ J[1]) / max(np.linalg.norm(J[0]) * np.linalg.norm(J[1]), 1e-300)
    if 1.0 - cos * cos > 10 * 1e-6:
        assert_close_relative(update(deconflict.GradOPS(0.0), J), pcgrad, 1e-10)


@given(seed=st.integers(0, 2**32 - 1), tasks=st.integers(2, 6))
def test_alpha_minus_one_is_imtl_g_when_all_conflict_at_full_rank(seed, tasks):
    J = build_jacobian("conflicting", seed, tasks, tasks + 3, 0.0)
    M = J @ J.T
    off = M - np.diag(np.diag(M))
    assume((off < 0).any(axis=1).all())
    assume(np.linalg.eigvalsh(M / np.diag(M).max())[0] > 1e-6)
    ours = update(deconflict.GradOPS(-1.0), J)
    imtl = update(deconflict.IMTLG(), J)
    cosine = ours @ imtl / (np.linalg.norm(ours) * np.linalg.norm(imtl))
    assert cosine > 1 - 1e-10


@given(J=jacobians(kinds=("random", "conflicting", "norm_spread", "zero_row", "duplicate",
                          "rank_deficient", "combination", "wide", "single"), scales=False),
       alpha=ALPHAS)
def test_agrees_with_literal_gram_schmidt(J, alpha):
    expected, modified, margin = gram_schmidt_gradops(J, alpha)
    # Within a factor 10 of the dependence threshold, rounding decides between the two codes.
    assume(margin > 1.0)
    c, diagnostics = gradops_weights(J @ J.T, alpha)
    assert_close_relative(c @ J, expected, 1e-6)
    projections = diagnostics["projection_coefficients"] @ J
    for i in np.flatnonzero(diagnostics["active"]):
        assert_close_relative(projections[i], modified[i], 1e-6, f"g'_{i}")


# ------------------------------------------------------------------------- golden values
def test_golden_two_tasks():
    """g1 = (1, 0), g2 = (-1, 1): g1 . g2 = -1, both conflict.

    g'_1 = g1 - (g1.g2 / |g2|^2) g2 = (1, 0) + (1/2)(-1, 1) = (1/2, 1/2)
    g'_2 = g2 - (g2.g1 / |g1|^2) g1 = (-1, 1) + (1, 0)     = (0, 1)
    G' = (1/2, 3/2); R_1 = G'.g1 / 1 = 1/2; R_2 = G'.g2 / sqrt(2) = 1/sqrt(2).
    r = R / mean(R): r_1 = 2 sqrt(2) - 2, r_2 = 4 - 2 sqrt(2) (they sum to 2).
    alpha = 0: D = G' = (1/2, 3/2).
    alpha = -1: with two tasks w_1 = 2 r_2 / (r_1 + r_2) = r_2 and w_2 = r_1, so
    D = (4 - 2 sqrt 2)(1/2, 1/2) + (2 sqrt 2 - 2)(0, 1) = (2 - sqrt 2, sqrt 2),
    which has equal projections 2 - sqrt 2 on both unit gradients (the IMTL-G direction).
    alpha = 1: w_i = r_i, D = (sqrt 2 - 1)(1, 1) + (4 - 2 sqrt 2)(0, 1) = (sqrt2 - 1, 3 - sqrt2).
    """
    J = np.array([[1.0, 0.0], [-1.0, 1.0]])
    s2 = math.sqrt(2.0)
    c, diagnostics = gradops_weights(J @ J.T, 0.0)
    np.testing.assert_allclose(c @ J, [0.5, 1.5], rtol=1e-14)
    np.testing.assert_allclose(diagnostics["projection_coefficients"] @ J,
                               [[0.5, 0.5], [0.0, 1.0]], atol=GOLDEN_RTOL)
    np.testing.assert_allclose(diagnostics["R"], [0.5, 1 / s2], rtol=1e-14)
    np.testing.assert_allclose(diagnostics["r"], [2 * s2 - 2, 4 - 2 * s2], rtol=1e-14)
    np.testing.assert_allclose(update(deconflict.GradOPS(-1.0), J), [2 - s2, s2], rtol=1e-14)
    np.testing.assert_allclose(update(deconflict.GradOPS(1.0), J), [s2 - 1, 3 - s2], rtol=1e-14)


def test_golden_three_tasks_one_unconflicted():
    """g1 = (1, 0, 0), g2 = (-1, 1, 0), g3 = (0, 0, 1): g3 conflicts with nobody.

    Task 1 projects off span{g2, g3} = {(a, b, c) : a = -b}: g'_1 = (1/2, 1/2, 0).
    Task 2 projects off span{g1, g3}: g'_2 = (0, 1, 0). g'_3 = g3.
    R_1 = (s_1 + M_13) / n_1 = (1/2 + 0) / 1 = 1/2; R_2 = (1 + 0) / sqrt 2; R_3 = (1 + 0) / 1 = 1.
    alpha = 0: D = (1/2, 3/2, 1).
    """
    J = np.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    c, diagnostics = gradops_weights(J @ J.T, 0.0)
    np.testing.assert_allclose(c @ J, [0.5, 1.5, 1.0], rtol=1e-14)
    np.testing.assert_allclose(diagnostics["R"], [0.5, 1 / math.sqrt(2), 1.0], rtol=1e-14)
    assert diagnostics["projected"].tolist() == [True, True, False]


# ---------------------------------------------------------------------------- edge cases
def test_single_task_returns_its_gradient():
    J = np.array([[3.0, -4.0]])
    np.testing.assert_array_equal(update(deconflict.GradOPS(-3.0), J), J[0])


def test_zero_gradient_is_dropped_from_the_weighting():
    J = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0]])
    c, diagnostics = gradops_weights(J @ J.T, -2.0)
    assert c[2] == 0.0
    assert diagnostics["active"].tolist() == [True, True, False]
    expected, *_ = gram_schmidt_gradops(J[:2], -2.0)
    np.testing.assert_allclose(c @ J, expected, rtol=1e-12)


def test_all_tasks_dependent_gives_zero_update():
    """Three gradients 120 degrees apart in the plane: each lies in the span of the others."""
    angles = np.deg2rad([90.0, 210.0, 330.0])
    J = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    c, diagnostics = gradops_weights(J @ J.T, -1.0)
    assert diagnostics["dependent"].all()
    np.testing.assert_array_equal(c, np.zeros(3))


def test_no_conflict_reweights_the_raw_gradients():
    """Without conflict g'_i = g_i and R_i = (M 1)_i / n_i."""
    J = np.array([[2.0, 0.0], [1.0, 1.0]])
    M = J @ J.T
    R = M.sum(axis=1) / np.sqrt(np.diag(M))
    r = R / R.mean()
    w = r**2 / np.mean(r**2)
    np.testing.assert_allclose(update(deconflict.GradOPS(2.0), J), w @ J, rtol=1e-14)


def test_duplicate_tasks_are_dependent_and_guarantee_holds():
    J = np.array([[1.0, 0.2, 0.0], [1.0, 0.2, 0.0], [-1.0, 0.5, 0.3]])
    c, diagnostics = gradops_weights(J @ J.T, -5.0)
    assert diagnostics["dependent"][:2].all()
    assert_non_conflicting(J, c @ J)


@pytest.mark.parametrize("cosine_gap", [1e-5, 1e-7, 1e-9, 1e-11])
def test_near_duplicates_keep_the_guarantee(cosine_gap):
    rng = np.random.default_rng(7)
    J = rng.standard_normal((4, 30))
    J[1] = -J[0] + 0.1 * J[1]
    direction = rng.standard_normal(30)
    direction -= direction @ J[0] / (J[0] @ J[0]) * J[0]
    angle = math.sqrt(2 * cosine_gap)
    J[3] = math.cos(angle) * J[0] + math.sin(angle) * np.linalg.norm(J[0]) * direction / (
        np.linalg.norm(direction))
    for alpha in (-5.0, 0.0, 5.0):
        c, diagnostics = gradops_weights(J @ J.T, alpha)
        assert_strongly_non_conflicting(J, diagnostics["projection_coefficients"])
        assert_non_conflicting(J, c @ J)


def test_norms_spanning_six_orders_agree_with_gram_schmidt():
    """An M-based pseudo-inverse was off by 60x here at alpha = -5; K-based is not
    (docs/methods.md#gradops)."""
    rng = np.random.default_rng(3)
    J = build_jacobian("conflicting", 11, 5, 12, 0.0) * np.array([[1e-3], [1e3], [1.0], [30.0],
                                                                   [1e-2]])
    J += 0.01 * rng.standard_normal(J.shape) * np.abs(J).max(axis=1, keepdims=True)
    expected, _, _ = gram_schmidt_gradops(J, -5.0)
    assert_close_relative(update(deconflict.GradOPS(-5.0), J), expected, 1e-8)


def test_gating_all_projects_every_task_once_any_conflicts():
    J = np.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    _, diagnostics = deconflict.GradOPS(gating="all").weights_with_diagnostics(J @ J.T)
    assert diagnostics["projected"].tolist() == [True, True, True]
    _, diagnostics = deconflict.GradOPS(gating="all").weights_with_diagnostics(np.eye(2))
    assert not diagnostics["projected"].any()


def test_weights_have_mean_one_over_the_active_set():
    J = build_jacobian("conflicting", 5, 4, 8, 0.0)
    _, diagnostics = gradops_weights(J @ J.T, -2.0)
    w = diagnostics["w"][diagnostics["active"]]
    assert w.mean() == pytest.approx(1.0, rel=1e-14)
    assert (w > 0).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "x"])
def test_non_finite_alpha_is_rejected(bad):
    with pytest.raises(deconflict.InvalidOptionError, match="alpha"):
        deconflict.GradOPS(alpha=bad)


def test_bad_gating_and_tolerance_are_rejected():
    with pytest.raises(deconflict.InvalidOptionError, match="gating"):
        deconflict.GradOPS(gating="some")
    with pytest.raises(deconflict.InvalidOptionError, match="dependence_tol"):
        deconflict.GradOPS(dependence_tol=1.5)
