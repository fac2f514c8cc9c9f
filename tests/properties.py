"""Named property assertions, shared by every method's tests.

Each takes plain arrays (float64 NumPy) so it can check any method's output, and fails with a
message that names the violated property and by how much.
"""

from __future__ import annotations

import numpy as np
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
