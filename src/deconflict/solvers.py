"""Small convex solvers over the probability simplex, in Gramian form (float64 NumPy).

- ``min_norm_point``: Wolfe's algorithm for the point of smallest norm in the convex hull of
  points given only by their Gramian (MGDA, the tensioner's bases). It is an active-set method:
  on the final support the answer solves a linear system exactly, so the result is exact up to
  rounding, not up to an iteration count.
- ``conflict_averse_weights``: the CAGrad dual, min over the simplex of
  w^T M a + c ||g_a|| sqrt(w^T M w), solved to machine precision through a one-dimensional
  monotone root find whose every evaluation is an exact ``min_norm_point``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq, nnls

from .linalg import normalized


def _affine_minimizer(G: np.ndarray) -> np.ndarray:
    """argmin over sum(y) = 1 (any sign) of y^T G y: solve [[G, 1], [1^T, 0]] [y; mu] = [0; 1]."""
    k = G.shape[0]
    if k == 1:
        return np.ones(1)
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = G
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    try:
        solution = np.linalg.solve(kkt, rhs)
        residual = kkt @ solution - rhs
        if float(np.max(np.abs(residual))) <= 1e-10:
            return solution[:k]
    except np.linalg.LinAlgError:
        pass
    # Affinely dependent points: any minimizer will do, lstsq picks the smallest one.
    return np.linalg.lstsq(kkt, rhs, rcond=1e-13)[0][:k]


def min_norm_point(gramian: np.ndarray, *, tol: float = 1e-12) -> np.ndarray:
    """Weights w in the simplex minimizing w^T G w (Wolfe, 1976), in Gramian form.

    Optimality (checked on exit, relative to the largest squared norm): (G w)_i >= w^T G w for
    every i, with equality on the support of w. If all points are zero, returns uniform weights.
    """
    T = gramian.shape[0]
    if T == 1:
        return np.ones(1)
    G, scale = normalized(gramian)
    if scale == 0.0:
        return np.full(T, 1.0 / T)
    if T == 2:
        return _segment_min_norm(G)
    first = int(np.argmin(np.diag(G)))
    w = np.zeros(T)
    w[first] = 1.0
    support = [first]
    best_w, best = w, float(G[first, first])
    for _ in range(20 * T + 50):
        Gw = G @ w
        norm2 = float(w @ Gw)
        entering = int(np.argmin(Gw))
        if Gw[entering] >= norm2 - tol or entering in support:
            break
        w, support = _minor_cycles(G, w, [*support, entering])
        value = float(w @ G @ w)
        if value >= best:
            break  # rounding has stalled the active set; keep the best point found
        best_w, best = w, value
    return best_w


def _segment_min_norm(G: np.ndarray) -> np.ndarray:
    """Two points: w_1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)."""
    curvature = G[0, 0] + G[1, 1] - 2.0 * G[0, 1]
    if curvature <= 0.0:
        first = 1.0 if G[0, 0] <= G[1, 1] else 0.0
    else:
        first = min(max((G[1, 1] - G[0, 1]) / curvature, 0.0), 1.0)
    return np.array([first, 1.0 - first])


def _minor_cycles(G: np.ndarray, w: np.ndarray, support: list[int]) -> tuple[np.ndarray, list[int]]:
    """Move w toward the affine minimizer of its support, dropping points that hit zero weight."""
    T = G.shape[0]
    while True:
        S = np.array(support)
        y = _affine_minimizer(G[np.ix_(S, S)])
        if np.all(y > 0.0):
            w = np.zeros(T)
            w[S] = y
            return w, support
        current = w[S]
        blocked = y <= 0.0
        ratios = current[blocked] / (current[blocked] - y[blocked])
        theta = float(np.min(ratios))
        current = current + theta * (y - current)
        keep = current > 1e-15
        keep[np.flatnonzero(blocked)[int(np.argmin(ratios))]] = False
        support = [int(i) for i in S[keep]]
        w = np.zeros(T)
        w[support] = current[keep]
        w /= w.sum()
        if len(support) == 1:
            return w, support


def conflict_averse_weights(
    gramian: np.ndarray, anchor: np.ndarray, c: float
) -> tuple[np.ndarray, float, float]:
    """Solve the CAGrad dual for the ball around g_a = J^T a of radius c ||g_a||.

    Returns (w, ||g_w||, ||g_a||) where w minimizes F(w) = g_w . g_a + c ||g_a|| ||g_w|| over
    the simplex (CAGrad paper, Eq. 3 dual; METHODS.md Section 6). The update is then
    D = g_a + (c ||g_a|| / ||g_w||) g_w. ||g_w|| = 0 is returned when the optimum is (within 1e-6
    of the largest gradient norm) a zero combination, where that direction is undefined.

    Method: F(w) = min over lam > 0 of g_w . g_a + (c'/2)(||g_w||^2 / lam + lam) with
    c' = c ||g_a||. For fixed kappa = c'/lam, the minimizer over w is the min-norm point of the
    shifted hull {g_i + g_a / kappa}, whose Gramian is M + (b 1^T + 1 b^T)/kappa + |g_a|^2/kappa^2
    with b = M a. The optimal lam equals ||g_w(lam)||, and ||g_w(lam)|| / lam is non-increasing
    (the partial minimum over w is convex in lam), so lam is the root of
    psi(lam) = ||g_w(lam)|| - lam. On a face of the simplex the optimum has a closed form
    (``_face_optimum``), checked against the KKT conditions: the full simplex and its vertices
    are tried first, then a coarse root find identifies the optimal face; if its check fails,
    the root find is run to machine precision instead.
    """
    M, scale = normalized(gramian)
    T = M.shape[0]
    b = M @ anchor
    anchor_sq = max(float(anchor @ b), 0.0)
    anchor_norm = math.sqrt(anchor_sq * scale)
    if scale == 0.0 or anchor_sq <= 1e-30 or c == 0.0:
        return np.full(T, 1.0 / T), 0.0, anchor_norm
    radius = c * math.sqrt(anchor_sq)

    def weights_at(lam: float) -> np.ndarray:
        kappa = radius / lam
        shifted = M + (b[:, None] + b[None, :]) / kappa + anchor_sq / kappa**2
        return min_norm_point(shifted)

    def psi(lam: float) -> float:
        w = weights_at(lam)
        return math.sqrt(max(float(w @ M @ w), 0.0)) - lam

    def finish(w: np.ndarray) -> tuple[np.ndarray, float, float]:
        return w, math.sqrt(max(float(w @ M @ w), 0.0) * scale), anchor_norm

    exact = _face_optimum(M, b, radius, np.ones(T, dtype=bool))
    if exact is None:
        exact = _vertex_optimum(M, b, radius)
    if exact is not None:
        return finish(exact)
    w_min = min_norm_point(M)
    low = math.sqrt(max(float(w_min @ M @ w_min), 0.0))
    high = math.sqrt(float(np.max(np.diag(M))))
    # Below ~1e-8 the norm of g_w cannot be resolved from a Gramian (w^T M w cancels to
    # rounding, ~1e-16 of the squared norms), so the search starts at 1e-6.
    floor = 1e-6 * high
    if low <= floor:
        low = floor
        if psi(low) <= 0.0:
            return weights_at(low), 0.0, anchor_norm
    if psi(high) >= 0.0:
        return finish(weights_at(high))
    if psi(low) <= 0.0:
        return finish(weights_at(low))
    coarse = brentq(psi, low, high, xtol=1e-6 * high, maxiter=200)
    support = weights_at(coarse) > 1e-9
    exact = _face_optimum(M, b, radius, support)
    if exact is not None:
        return finish(exact)
    lam = brentq(psi, low, high, xtol=1e-15 * high, rtol=4 * np.finfo(float).eps, maxiter=200)
    return finish(weights_at(lam))


def _face_optimum(
    M: np.ndarray, b: np.ndarray, radius: float, support: np.ndarray
) -> np.ndarray | None:
    """The CAGrad dual optimum restricted to a face of the simplex, if it is the global one.

    On the face S (weights free in sign, summing to 1) stationarity reads
    b_S + radius M_SS w / ||g_w|| = mu 1. With u = M_SS^-1 1, v = M_SS^-1 b_S, a = 1.u,
    beta = 1.v, gamma = b_S.v, the solution is w = (mu u - v) / sqrt(disc) with
    disc = beta^2 - a (gamma - radius^2) and mu = (beta + sqrt(disc)) / a. It is the global
    optimum when w > 0 and no task outside S has a smaller partial derivative than mu.
    Returns None when M_SS is singular, disc <= 0 or a condition fails.
    """
    S = np.flatnonzero(support)
    if S.size == 0:
        return None
    M_S = M[np.ix_(S, S)] if S.size < M.shape[0] else M
    values, vectors = np.linalg.eigh(M_S)
    if values[0] <= 1e-12 * values[-1]:
        return None
    both = vectors @ ((vectors.T @ np.column_stack([np.ones(S.size), b[S]])) / values[:, None])
    u, v = both[:, 0], both[:, 1]
    a, beta, gamma = float(u.sum()), float(v.sum()), float(b[S] @ v)
    disc = beta * beta - a * (gamma - radius * radius)
    if a <= 0.0 or disc <= 0.0:
        return None
    mu = (beta + math.sqrt(disc)) / a
    w_S = (mu * u - v) / math.sqrt(disc)
    if np.min(w_S) <= 0.0:
        return None
    w = np.zeros(M.shape[0])
    w[S] = w_S
    gw_norm = math.sqrt(max(float(w @ M @ w), 0.0))
    gradient = b + radius * (M @ w) / gw_norm
    if np.min(gradient) < mu - 1e-9 * (abs(mu) + radius):
        return None
    return w


def _vertex_optimum(M: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray | None:
    """The CAGrad dual optimum if it is a vertex e_i of the simplex, else None.

    At e_i (with g_i != 0) the partial derivatives are b + radius M e_i / ||g_i||; the vertex is
    optimal when none is smaller than the i-th.
    """
    norms = np.sqrt(np.maximum(np.diag(M), 0.0))
    live = norms > 0
    gradients = b[:, None] + radius * M / np.where(live, norms, 1.0)[None, :]
    own = np.diag(gradients)
    optimal = live & (gradients.min(axis=0) >= own - 1e-9 * (np.abs(own) + radius))
    if not optimal.any():
        return None
    value = b + radius * norms  # F(e_i)
    best = int(np.flatnonzero(optimal)[np.argmin(value[optimal])])
    w = np.zeros(M.shape[0])
    w[best] = 1.0
    return w


def dual_cone_weights(gramian: np.ndarray, targets: np.ndarray, reg_eps: float = 0.0) -> np.ndarray:
    """For each row u of ``targets``, v*(u) = argmin over v >= u of v^T M v (rows of the result).

    J^T v*(u) is the projection of J^T u onto the dual cone {x : J x >= 0} (UPGrad, DualProj;
    METHODS.md Section 15). The problem is covariant under rescaling each task: with N = diag(s),
    v*(u) for M is N^-1 y*(N u) for N^-1 M N^-1. With reg_eps = 0 it is solved on the cosine
    matrix (s = gradient norms), which stays accurate when norms differ by orders of magnitude
    (on M / tr(M) a norm 1e-3 of the largest puts eigenvalues at 1e-12, where the eigensolver's
    error is 2e-4 relative, measured as conflicts of 6e-5). With reg_eps > 0 it is TorchJD's
    problem, M / tr(M) + reg_eps I.

    With a factor G = L L^T, each problem is the non-negative least squares
    min over z >= 0 of ||L^T z + L^T y0||^2 with y = y0 + z, solved exactly by Lawson-Hanson
    (``scipy.optimize.nnls``). L comes from an eigendecomposition, so a singular G is fine, and
    then G y >= 0 holds exactly: no conflict.
    """
    targets = np.array(np.atleast_2d(targets), dtype=np.float64)
    diagonal = np.diag(gramian)
    trace = float(diagonal.sum())
    # A zero gradient touches no dot product: its coefficient stays u_k. Keeping it in the QP
    # would hand NNLS a factor column of pure rounding noise to lean on (seen: 1e14 weights).
    live = np.flatnonzero(diagonal > 0)
    if trace <= 0.0 or live.size == 0:
        return targets
    scale = np.sqrt(diagonal[live]) if reg_eps == 0.0 else np.full(live.size, math.sqrt(trace))
    G = gramian[np.ix_(live, live)] / np.outer(scale, scale) + reg_eps * np.eye(live.size)
    values, vectors = np.linalg.eigh(G)
    keep = values > 1e-14 * max(float(values[-1]), 0.0)
    factor_t = (vectors[:, keep] * np.sqrt(values[keep])).T  # L^T with G = L L^T, r x live
    solutions = targets.copy()
    for row, u in enumerate(targets):
        start = scale * u[live]
        z, _ = nnls(factor_t, -(factor_t @ start), maxiter=50 * gramian.shape[0])
        solutions[row, live] = (start + z) / scale
    return solutions


_EPS = float(np.finfo(np.float64).eps)
# Nash-MTL weights beyond this (on a Gramian scaled to unit largest diagonal) have diverged.
_DIVERGED = 1e10


def nash_bargaining_weights(
    gramian: np.ndarray, start: np.ndarray | None = None, *, tol: float = 1e-12,
    max_iterations: int = 100,
) -> tuple[np.ndarray, bool]:
    """alpha > 0 with alpha_i (M alpha)_i = 1 for every task with a nonzero gradient.

    Nash-MTL's bargaining solution (METHODS.md Section 13). It minimizes the convex
    f(alpha) = alpha^T M alpha / 2 - sum_i log alpha_i, whose gradient is M alpha - 1/alpha:
    damped Newton steps (Hessian M + diag(1 / alpha^2)) with backtracking that keeps alpha > 0.
    Tasks with zero gradient get alpha_i = 0. Returns (alpha, converged); it does not converge
    when the hull of the gradients contains 0 (Pareto-stationary: alpha diverges along a null
    vector of M), and then stops after ``max_iterations`` with the last iterate.
    """
    T = gramian.shape[0]
    alpha = np.zeros(T)
    live = np.flatnonzero(np.diag(gramian) > 0)
    if live.size == 0:
        return alpha, True
    M, scale = normalized(gramian[np.ix_(live, live)])
    x = 1.0 / np.sqrt(np.diag(M))
    if start is not None and np.isfinite(start[live]).all() and (start[live] > 0).all():
        x = start[live]
    # The best point on the ray through x: f(t x) is minimal at t = sqrt(T / x^T M x). This puts
    # a warm start from a step with gradients of another scale at the right scale.
    curvature = float(x @ M @ x)
    if curvature > 0:
        x = x * math.sqrt(live.size / curvature)

    def objective(y: np.ndarray) -> float:
        return 0.5 * float(y @ M @ y) - float(np.log(y).sum())

    def residual_of(y: np.ndarray) -> float:
        # Measured against its own rounding error, which grows with alpha (large when the
        # gradients nearly cancel): |y_i (M y)_i - 1| beyond ~eps * y_i (|M| y)_i is real.
        # Once that error reaches 1e-6 the equation is no longer resolved (alpha diverging at a
        # Pareto-stationary point), and nothing counts as converged.
        noise = 64.0 * _EPS * float(np.max(y * (np.abs(M) @ y)))
        raw = float(np.max(np.abs(y * (M @ y) - 1.0)))
        return max(raw - noise, 0.0) if noise < 1e-6 else max(raw, tol * 2)

    converged = False
    value, residual = objective(x), residual_of(x)
    for _ in range(max_iterations):
        if residual <= tol:
            converged = True
            break
        if float(np.max(x)) > _DIVERGED:
            break  # alpha runs off along a null vector of M: Pareto-stationary
        gradient = M @ x - 1.0 / x
        try:
            step = np.linalg.solve(M + np.diag(1.0 / (x * x)), gradient)
        except np.linalg.LinAlgError:
            break
        decrement = float(gradient @ step)
        t = 1.0
        while True:
            candidate = x - t * step
            if (candidate > 0).all():
                new_value, new_residual = objective(candidate), residual_of(candidate)
                # Armijo on f far from the optimum; near it f stops resolving progress (its
                # changes fall below rounding), and the optimality residual takes over.
                if (new_value <= value - 0.25 * t * decrement or new_residual < residual
                        or t < 1e-12):
                    break
            t *= 0.5
        x, value, residual = candidate, new_value, new_residual
    alpha[live] = x / math.sqrt(scale)
    return alpha, converged
