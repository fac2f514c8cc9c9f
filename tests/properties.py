"""Named property assertions, shared by every method's tests.

Each takes plain arrays (float64 NumPy) so it can check any method's output, and fails with a
message that names the violated property and by how much.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import deconflict


def as_array(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_finite(values, what: str = "output") -> None:
    values = as_array(values)
    assert np.isfinite(values).all(), f"{what} is not finite: {values}"


def relative_dots(J: np.ndarray, D: np.ndarray) -> np.ndarray:
    """cos(g_j, D) with 0 where g_j or D is zero."""
    norms = np.linalg.norm(J, axis=1) * np.linalg.norm(D)
    dots = J @ D
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)


def assert_non_conflicting(J, D, rtol: float = 1e-6) -> None:
    """g_j . D >= -rtol ||g_j|| ||D|| for every task j (weak non-conflict)."""
    J, D = as_array(J), as_array(D)
    cosines = relative_dots(J, D)
    assert cosines.min() >= -rtol, (
        f"update conflicts with task {int(cosines.argmin())}: cos = {cosines.min():.3e}"
    )


def assert_strongly_non_conflicting(J, rows, rtol: float = 1e-6) -> None:
    """Every modified gradient g'_i = rows[i] @ J has g'_i . g_j >= -rtol |g'_i| |g_j|."""
    J, rows = as_array(J), as_array(rows)
    for i, row in enumerate(rows):
        modified = row @ J
        cosines = relative_dots(J, modified)
        assert cosines.min() >= -rtol, (
            f"modified gradient {i} conflicts with task {int(cosines.argmin())}: "
            f"cos = {cosines.min():.3e}"
        )


def assert_close_relative(
    actual, expected, rtol: float, what: str = "update", atol: float = 0.0
) -> None:
    """||actual - expected|| <= rtol * max(||expected||, ||actual||) + atol (both zero passes)."""
    actual, expected = as_array(actual), as_array(expected)
    scale = max(np.linalg.norm(expected), np.linalg.norm(actual))
    error = np.linalg.norm(actual - expected)
    assert error <= rtol * scale + atol or scale == 0.0, (
        f"{what} differs by {error / scale:.3e} relative (allowed {rtol:g}):\n"
        f"actual   {actual}\nexpected {expected}"
    )


def rounding_scale(J) -> float:
    """An absolute tolerance for updates that cancel to rounding: 1e-12 of sum_i ||g_i||."""
    return 1e-12 * float(np.linalg.norm(as_array(J), axis=1).sum())


def assert_positive_multiple(D, g, rtol: float = 1e-9) -> None:
    """D = s g for some s > 0 (or both zero)."""
    D, g = as_array(D), as_array(g)
    if np.linalg.norm(g) == 0.0:
        assert np.linalg.norm(D) == 0.0, f"zero gradient but nonzero update {D}"
        return
    scale = (D @ g) / (g @ g)
    assert scale > 0, f"update {D} is not a positive multiple of {g}"
    assert_close_relative(D, scale * g, rtol, "single-task update")


def assert_on_simplex(w, atol: float = 1e-12) -> None:
    w = as_array(w)
    assert w.min() >= -atol, f"negative weight {w.min()}"
    assert abs(w.sum() - 1.0) <= 1e-10, f"weights sum to {w.sum()}"


def assert_min_norm_optimal(M, w, rtol: float = 1e-9) -> None:
    """KKT of min w^T M w on the simplex: (M w)_i >= w^T M w, equality on the support."""
    M, w = as_array(M), as_array(w)
    assert_on_simplex(w)
    Mw = M @ w
    value = w @ Mw
    scale = max(np.max(np.diag(M)), 1e-300)
    assert Mw.min() >= value - rtol * scale, f"not optimal: min (Mw) {Mw.min()} < {value}"
    support = w > 1e-9
    assert np.all(np.abs(Mw[support] - value) <= rtol * scale * 10), (
        f"complementary slackness fails on the support: {Mw[support]} vs {value}"
    )


def update(method, J: np.ndarray, **context) -> np.ndarray:
    """deconflict.aggregate in float64, as an array."""
    return as_array(deconflict.aggregate(torch.from_numpy(J), method, **context))


def manual_jacobian(losses, params) -> torch.Tensor:
    """The T x d Jacobian by one autograd.grad per loss (zeros where a loss misses a parameter):
    the reference the engine's modes are checked against."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for p, g in zip(params, grads, strict=True)]))
    return torch.stack(rows)


def same_state(a, b) -> bool:
    """Exact equality of two method states (nested dicts and lists of tensors and arrays)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def conflict_tolerances(J, weights) -> np.ndarray:
    """Per task j, the rounding error allowed in g_j . D for an update D = J^T c, from the
    error analysis (never from what one machine showed):

    - the Gramian M = J J^T (d products per entry, |M_jk| <= n_j n_k) and the method's float64
      solve on it (T-term sums (M c)_j and c^T M c): 4 (T + 2) eps (n_j + sigma) sigma, with
      n_j = ||g_j|| and sigma = sum_k |c_k| n_k (the size of the terms that cancel in D);
    - D = J^T c (T terms per coordinate: ||error|| <= gamma_T sigma) and g_j . D (d terms):
      (2 T + 2 d) eps n_j sigma.

    So tol_j = (6 T + 2 d + 8) eps (n_j + sigma) sigma: for weights that do not cancel
    (sigma ~ ||D||) that is a few hundred eps in cosine, whatever the norms.
    """
    J, weights = as_array(J), as_array(weights)
    T, d = J.shape
    norms = np.linalg.norm(J, axis=1)
    sigma = float(np.abs(weights) @ norms)
    return (6 * T + 2 * d + 8) * np.finfo(np.float64).eps * (norms + sigma) * sigma


def assert_no_conflict(J, D, tol) -> None:
    """g_j . D >= -tol_j for every task j (tol: one value or one per task, e.g. from
    ``conflict_tolerances``), with a message naming the task and the cosine."""
    J, D = as_array(J), as_array(D)
    dots = J @ D
    excess = -dots - np.broadcast_to(np.asarray(tol, dtype=np.float64), dots.shape)
    j = int(np.argmax(excess))
    assert excess[j] <= 0.0, (
        f"update conflicts with task {j}: g_j . D = {dots[j]:.3e} "
        f"(allowed {-dots[j] - excess[j]:.3e}), cos = {relative_dots(J, D)[j]:.3e}"
    )


# ------------------------------------------------------------------------- stationarity
# Strongly stationary J (a strictly positive combination of the rows vanishes) are weakly
# stationary (a non-negative one does); the classes of strategies.STATIONARITY.
_STATIONARY_UNDER = {"strong": ("strong",), "weak": ("strong", "weak")}


def assert_zero_only_where_stationary(D, stationarity: str, claim: str, what: str) -> None:
    """The stationarity property: D = 0 only where J is stationary in the sense ``claim``.

    ``claim`` "strong": D != 0 unless J is strongly stationary (UPGrad, DualProj: the dual
    cone {x : J x >= 0} then reduces to the null space of J); "weak": D != 0 unless J is
    weakly stationary (MGDA: 0 lies in the convex hull of the gradients). ``stationarity`` is
    J's class by construction ("strong", "weak" or "none").
    """
    D = as_array(D)
    if stationarity in _STATIONARY_UNDER[claim]:
        return
    assert np.linalg.norm(D) > 0.0, (
        f"{what} is zero on a J that is not {claim}ly stationary (class {stationarity!r})")


def assert_zero_where_stationary(D, stationarity: str, claim: str, what: str) -> None:
    """The converse, for methods whose update is zero exactly at stationary J."""
    D = as_array(D)
    if stationarity in _STATIONARY_UNDER[claim]:
        assert np.linalg.norm(D) == 0.0, (
            f"{what} is {D} on a {stationarity}ly stationary J, where it must be exactly 0")


def assert_dual_cone_projection(M, u, v, rtol: float) -> None:
    """KKT certificate that J^T v is the projection of J^T u onto {x : J x >= 0}.

    With y = J^T v and lambda = v - u (the projection's multipliers): lambda >= 0, J y = M v >= 0
    and lambda . (M v) = 0 (Gramian form of UPGrad's KKT conditions). Each is checked relative
    to the float64 scale of its terms: with n_k = ||g_k|| and B = sum_j n_j |v_j| (so
    |(M v)_k| <= n_k B term by term), (M v)_k >= -rtol n_k B, lambda_k >= -rtol |v_k| and
    |lambda_k (M v)_k| <= rtol (|u_k| + |v_k|) n_k B.
    """
    M, u, v = as_array(M), as_array(u), as_array(v)
    n = np.sqrt(np.maximum(np.diag(M), 0.0))
    budget = float(n @ np.abs(v))
    Mv = M @ v
    lam = v - u
    k = int(np.argmin(Mv / np.where(n > 0, n, 1.0)))
    assert Mv[k] >= -rtol * n[k] * budget, (
        f"projection conflicts with task {k}: (J y)_k = {Mv[k]:.3e}, allowed "
        f"{-rtol * n[k] * budget:.3e}")
    assert (lam >= -rtol * np.abs(v)).all(), f"negative multiplier: lambda = {lam}"
    slack = np.abs(lam * Mv)
    allowed = rtol * (np.abs(u) + np.abs(v)) * n * budget
    assert (slack <= allowed).all(), (
        f"complementary slackness fails: |lambda (M v)| = {slack.max():.3e} for task "
        f"{int(np.argmax(slack - allowed))}")


# ------------------------------------------------------------------- rounding-error bounds
def gamma(n: int, dtype: torch.dtype = torch.float64) -> float:
    """Higham's gamma_n = n u / (1 - n u), u the unit roundoff (eps / 2) of ``dtype``.

    Bounds that hold on every IEEE machine, whatever the order of the operations (recursive,
    pairwise, blocked, split across SIMD lanes of any width, with or without fused
    multiply-adds): a sum of n terms errs by at most gamma_{n-1} sum |terms|, and a dot product
    of length n (products rounded too) by at most gamma_n sum_k |x_k y_k| <= gamma_n |x| |y|.
    Two such evaluations of one sum differ by at most twice that. Tolerances derived from it
    never depend on the error one machine happened to show.
    """
    u = float(torch.finfo(dtype).eps) / 2.0
    assert n * u < 1.0
    return n * u / (1.0 - n * u)


def dot_error_bound(A, B, n: int | None = None) -> np.ndarray:
    """gamma_n |A| |B|^T entrywise: the worst float64 error of any evaluation of A B^T (n terms;
    default A's number of columns)."""
    A, B = np.abs(as_array(A)), np.abs(as_array(B))
    return gamma(A.shape[1] if n is None else n) * (A @ B.T)


def solve_rtol(condition: float, n: int) -> float:
    """How far two backward-stable solutions of one n x n problem may be apart, relatively.

    Cholesky, QR, eigh and an active-set QP's final system each return the exact answer of a
    problem perturbed by at most ~ n gamma_{n+1} relative (Higham, Thm 10.3 for Cholesky);
    the forward error is at most ``condition`` times that to first order, and two such
    solutions are at most twice as far apart: 2 condition n gamma_{n+1}.
    """
    return 2.0 * condition * n * gamma(n + 1)


def combination_rtol(J, D, extra: int = 3) -> float:
    """How far two float64 evaluations of D = J^T w (0 <= w_i <= 1, from the same draws) may be
    apart relative to ||D||: each weight is computed to within gamma_extra of itself (a softmax
    or a comparison of the same draws), each sum of T terms to within gamma_T of sum_i |g_i|,
    so twice gamma_{T + extra} || sum_i |g_i| || / ||D|| bounds the difference."""
    J, D = as_array(J), as_array(D)
    scale = float(np.linalg.norm(np.abs(J).sum(axis=0)))
    return 2.0 * gamma(J.shape[0] + extra) * scale / max(float(np.linalg.norm(D)), 1e-300)


# Hand-checked cases (2-3 tasks, small integers): each output is at most ~64 roundings of
# quantities with condition number <= 10, so 10 gamma_64 (7e-14) bounds their error anywhere.
GOLDEN_RTOL = 10.0 * gamma(64)


def nnls_kkt_rtol(T: int) -> float:
    """The KKT residual of an NNLS projection (``solvers.dual_cone_weights``) relative to
    n_k sum_j n_j |v_j|: Householder QR's backward error on the at most 2T x T least squares,
    ~ 2 T^2 eps, plus T eps from the Tikhonov term and gamma_T from evaluating M v."""
    return (2 * T * T + 2 * T) * float(np.finfo(np.float64).eps)


# ----------------------------------------------------- the CAGrad dual's KKT conditions
EPS = float(np.finfo(np.float64).eps)


def conflict_averse_tolerances(J, anchor, c, w, gw_norm):
    """Per task i, the rounding error allowed in the dual's KKT condition g_i . D >= F(w).

    With n_i = ||g_i||, tau = sum_k w_k n_k, rho = tau / ||g_w||, kappa = sum_k |a_k| n_k /
    ||g_a|| (how much g_w and g_a cancel), r = c ||g_a|| and sigma = sum_k |a_k| n_k + r rho
    (the terms that cancel in D = J^T c), forming M = J J^T (d terms per entry) and the solver's
    T-term sums err by (6 T + 2 d + 8) eps (n_i + tau) sigma (as ``conflict_tolerances``);
    ||g_w||^2 and ||g_a||^2 taken from M err by that factor times rho^2 and kappa^2 relative,
    which moves g_i . D - F(w) by r (rho^2 + kappa^2) (n_i + ||g_w||) times it.
    """
    T, d = J.shape
    n = np.linalg.norm(J, axis=1)
    anchor_norm = float(np.linalg.norm(anchor @ J))
    radius = c * anchor_norm
    tau = float(w @ n)
    rho = tau / gw_norm
    l1 = float(np.abs(anchor) @ n)
    sigma = l1 + radius * rho
    spread = rho * rho + (l1 / anchor_norm) ** 2
    return (6 * T + 2 * d + 8) * EPS * ((n + tau) * sigma + radius * spread * (n + gw_norm))


def resolution_factor(J) -> float:
    """Squared norms below this times the squared length of their terms are rounding noise in
    M: the solver's cut (1e3 gamma_T, gamma_T = 4 (T + 2) eps) plus M's own error."""
    T, d = J.shape
    return (1e3 * 4 * (T + 2) + 6 * T + 2 * d + 8) * EPS


def assert_conflict_averse_optimal(J, anchor, c, solution):
    """The KKT conditions of the CAGrad dual on the original Gramian, within
    ``conflict_averse_tolerances``: g_i . D >= F(w) for every task, = on the support, with
    D = J^T (a + (c ||g_a|| / ||g_w||) w); ``gw_norm`` is ||J^T w||. A zero ``gw_norm`` must be
    a vanishing combination (to the resolution of M) unless the ball is a point."""
    M = J @ J.T
    w = solution.weights
    assert_on_simplex(w)
    n = np.linalg.norm(J, axis=1)
    tau = float(w @ n)
    true_sq = float(np.linalg.norm(w @ J)) ** 2
    if solution.gw_norm == 0.0:
        l1 = float(np.abs(anchor) @ n)
        if c > 0.0 and solution.anchor_norm ** 2 > resolution_factor(J) * l1 * l1:
            assert true_sq <= resolution_factor(J) * tau * tau, (
                f"gw_norm = 0 but ||J^T w|| = {math.sqrt(true_sq):.3e} (tau = {tau:.3e})")
        return
    assert abs(solution.gw_norm ** 2 - true_sq) <= (6 * J.shape[0] + 2 * J.shape[1] + 8) * (
        EPS * tau * tau), f"gw_norm {solution.gw_norm:.6e} but ||J^T w|| = {true_sq ** 0.5:.6e}"
    weights = anchor + (c * solution.anchor_norm / solution.gw_norm) * w
    gradient = M @ weights  # g_i . D = dF/dw_i
    value = float(w @ gradient)  # F(w)
    tol = conflict_averse_tolerances(J, anchor, c, w, solution.gw_norm)
    i = int(np.argmax((value - gradient) - tol))
    assert gradient[i] >= value - tol[i], (
        f"not optimal: task {i} has g_i . D = {gradient[i]:.6e} < F = {value:.6e} "
        f"(allowed {tol[i]:.3e})")
    support = np.flatnonzero(w > 0.0)
    gap = np.abs(gradient[support] - value) - tol[support]
    assert gap.max() <= 0.0, (
        f"complementary slackness fails on task {int(support[np.argmax(gap)])}: "
        f"{gradient[support]} vs F = {value:.6e}")


def exhaustive_dual_optimum(J, anchor, c):
    """(F*, w*) of the CAGrad dual for the exact J, in 60-digit arithmetic: the best of every
    face's closed-form optimum (x0 - p ||x0|| / sqrt(r^2 - ||p||^2), from the bordered systems
    [[M_SS, 1], [1^T, 0]] in M itself) whose weights are positive. The global optimum lies in
    the relative interior of some face, where it is that face's affine optimum."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp
    mp.dps = 60
    T = J.shape[0]
    Jm = mpmath.matrix(J.tolist())
    M = Jm * Jm.T
    a = mpmath.matrix(anchor.tolist())
    b = M * a
    radius = c * mpmath.sqrt((a.T * M * a)[0])

    def value(w):
        quadratic = mpmath.fsum(w[i] * M[i, j] * w[j] for i in range(T) for j in range(T))
        return mpmath.fsum(w[i] * b[i] for i in range(T)) + radius * mpmath.sqrt(
            max(quadratic, 0))

    best, best_w = mpmath.inf, None
    for k in range(1, T + 1):
        for S in itertools.combinations(range(T), k):
            system = mpmath.zeros(k + 1, k + 1)
            for i, p in enumerate(S):
                for j, q in enumerate(S):
                    system[i, j] = M[p, q]
                system[i, k] = system[k, i] = 1
            try:
                y = mpmath.lu_solve(system, mpmath.matrix([0] * k + [1]))
                omega = mpmath.lu_solve(system, mpmath.matrix([b[p] for p in S] + [0]))
            except (ZeroDivisionError, TypeError):  # affinely dependent: another face has it
                continue

            def quad(u, v, S=S, k=k):
                return mpmath.fsum(u[i] * M[S[i], S[j]] * v[j] for i in range(k)
                                   for j in range(k))

            x0_sq, p_sq = max(quad(y, y), 0), quad(omega, omega)
            if p_sq >= radius * radius:
                continue
            t = mpmath.sqrt(x0_sq / (radius * radius - p_sq))
            w_S = [y[i] - omega[i] * t for i in range(k)]
            if min(w_S) <= 0:
                continue
            w = [mpmath.mpf(0)] * T
            for i, p in enumerate(S):
                w[p] = w_S[i]
            F = value(w)
            if F < best:
                best, best_w = F, w
    return best, best_w, value
