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
from scipy.optimize import brentq, linprog, nnls

from .linalg import cosine_matrix, normalized, task_norms

_EPS = float(np.finfo(np.float64).eps)


def rounding_bounds(gramian: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per task j, a bound on the rounding error of g_j . D for D = J^T w computed from M.

    (M w)_j is a sum of T products M_jk w_k with |M_jk| <= n_j n_k (Cauchy-Schwarz), so in
    float64 it errs by at most gamma_T n_j sigma, sigma = sum_k |w_k| n_k, gamma_T ~ T eps; the
    factor 4 (T + 2) eps also covers forming w and one more sum over the tasks.
    """
    norms = task_norms(gramian)
    T = gramian.shape[0]
    return 4.0 * (T + 2) * _EPS * norms * float(np.abs(weights) @ norms)


def conflicts(gramian: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Which tasks D = J^T w conflicts with beyond rounding: (M w)_j < -rounding_bounds_j."""
    return gramian @ weights < -rounding_bounds(gramian, weights)


def min_norm_point(gramian: np.ndarray) -> np.ndarray:
    """Weights w in the simplex minimizing w^T M w (Wolfe, 1976), in Gramian form.

    ``min_norm_solution`` with its verification flag dropped; see there.
    """
    return min_norm_solution(gramian)[0]


def min_norm_solution(gramian: np.ndarray) -> tuple[np.ndarray, bool]:
    """(w, verified): w in the simplex minimizing w^T M w (Wolfe, 1976), in Gramian form.

    Scale. Every quantity is computed from the cosine matrix K = N^-1 M N^-1 and the norms
    n_i = sqrt(M_ii) divided by the largest (N = diag(n)), never from M / max(M_ii) with an
    absolute tolerance: with norms spanning 1e12 the small tasks' products sit at 1e-24 of the
    largest, below any absolute threshold (this stopped MGDA at a vertex that conflicts with
    another task). The affine minimizer of a support S solves the bordered system
    [[K_SS, u], [u^T, 0]] [z; mu] = [0; 1] with u_i = min_S n / n_i, then w_S ∝ z / n_S, which is
    as well conditioned as the cosines, whatever the norms.

    Verification (KKT on the original M). At the optimum x = J^T w satisfies
    (M w)_j >= w^T M w for every j. Forming (M w)_j (T products) and w^T M w = sum_k w_k (M w)_k
    (T more) in float64 errs by at most gamma = 2 (T + 2) eps times n_j sigma and sigma^2, with
    sigma = sum_k w_k n_k, so w passes when, for every j,

        (M w)_j >= w^T M w - tol_j,   tol_j = 4 (T + 2) eps (n_j + sigma) sigma.

    Then g_j . x >= ||x||^2 - tol_j, and in cosines cos(g_j, x) >= -4 (T + 2) eps rho (1 + rho),
    rho = sigma / ||x|| >= 1 (how much the weighted gradients cancel); errors already in M (from
    forming it) add to the same bound. ``verified`` is False when rounding stalls the active
    set before the test passes: callers must not present w as optimal then.
    A zero gradient is the hull's point of least norm: w is its vertex (uniform if all are 0).
    """
    T = gramian.shape[0]
    if T == 1:
        return np.ones(1), True
    n = task_norms(gramian)
    largest = float(n.max())
    if largest == 0.0:
        return np.full(T, 1.0 / T), True
    zero = np.flatnonzero(n == 0.0)
    if zero.size:
        w = np.zeros(T)
        w[zero[0]] = 1.0
        return w, True
    K = cosine_matrix(gramian, n)
    s = n / largest
    G = K * np.outer(s, s)
    tolerance_factor = 4.0 * (T + 2) * _EPS

    def violations(w: np.ndarray) -> tuple[np.ndarray, float]:
        Gw = G @ w
        value = float(w @ Gw)
        sigma = float(w @ s)
        return (value - Gw) - tolerance_factor * (s + sigma) * sigma, value

    if T == 2:
        w = _segment_min_norm(G)
        excess, _ = violations(w)
        return w, bool(excess.max() <= 0.0)
    first = int(np.argmin(s))
    w = np.zeros(T)
    w[first] = 1.0
    support = [first]
    excess, best = violations(w)
    for _ in range(20 * T + 50):
        if excess.max() <= 0.0:
            return w, True
        # The most violated constraint relative to its task's norm (scale-free choice).
        entering = int(np.argmax(excess / s))
        if entering in support:
            break
        candidate, candidate_support = _minor_cycles(K, s, w, [*support, entering])
        candidate_excess, value = violations(candidate)
        if value >= best:
            break  # rounding has stalled the active set; keep the best point found
        w, support, excess, best = candidate, candidate_support, candidate_excess, value
    return w, bool(excess.max() <= 0.0)


def _segment_min_norm(G: np.ndarray) -> np.ndarray:
    """Two points: w_1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1), w_2 likewise.

    Each weight gets its own quotient: w_2 = 1 - w_1 would lose a small w_2 to cancellation
    (relative error eps / w_2; for norms 1e10 apart that is 1e-6, enough to conflict).
    """
    curvature = G[0, 0] + G[1, 1] - 2.0 * G[0, 1]
    if curvature <= 0.0:
        first = 1.0 if G[0, 0] <= G[1, 1] else 0.0
        return np.array([first, 1.0 - first])
    first = (G[1, 1] - G[0, 1]) / curvature
    if first <= 0.0:
        return np.array([0.0, 1.0])
    second = (G[0, 0] - G[0, 1]) / curvature
    if second <= 0.0:
        return np.array([1.0, 0.0])
    return np.array([first, second]) / (first + second)


def _affine_minimizer(K: np.ndarray, s: np.ndarray) -> np.ndarray:
    """argmin over sum(y) = 1 (any sign) of y^T (N K N) y, N = diag(s), through z = N y.

    The bordered system [[K, u], [u^T, 0]] [z; mu] = [0; 1], u = min(s) / s, is scaled like the
    cosines; y = z / s is then normalized to sum 1.
    """
    k = K.shape[0]
    if k == 1:
        return np.ones(1)
    u = float(s.min()) / s
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = K
    kkt[:k, k] = u
    kkt[k, :k] = u
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    solution = None
    try:
        solution = np.linalg.solve(kkt, rhs)
        residual = kkt @ solution - rhs
        if float(np.max(np.abs(residual))) > 1e-10 * max(1.0, float(np.abs(solution).max())):
            solution = None
    except np.linalg.LinAlgError:
        pass
    if solution is None:
        # Affinely dependent points: any minimizer will do, lstsq picks the smallest one.
        solution = np.linalg.lstsq(kkt, rhs, rcond=1e-13)[0]
    y = solution[:k] / s
    total = float(y.sum())
    return y / total if total != 0.0 else np.full(k, 1.0 / k)


def _minor_cycles(
    K: np.ndarray, s: np.ndarray, w: np.ndarray, support: list[int]
) -> tuple[np.ndarray, list[int]]:
    """Move w toward the affine minimizer of its support, dropping points that hit zero weight.

    A weight is dropped when its share of sum_k w_k n_k (its vector's share of the combination)
    falls below rounding, not its raw value: a large gradient with a tiny weight still counts.
    """
    T = K.shape[0]
    while True:
        S = np.array(support)
        y = _affine_minimizer(K[np.ix_(S, S)], s[S])
        if np.all(y > 0.0):
            w = np.zeros(T)
            w[S] = y
            return w, support
        current = w[S]
        blocked = y <= 0.0
        ratios = current[blocked] / (current[blocked] - y[blocked])
        theta = float(np.min(ratios))
        current = current + theta * (y - current)
        share = current * s[S]
        keep = share > 1e-15 * float(np.abs(share).sum())
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
    (``scipy.optimize.nnls``). L comes from an eigendecomposition, so a singular G is fine.

    At a weakly stationary J (a non-negative w != 0 with J^T w = 0) the projection is unique but
    z is not: z + t w is optimal for every t >= 0, and NNLS wanders along that ray (seen:
    weights of 1e13 whose J^T c is all cancellation, so the engine's rounding floor zeroed a
    projection of norm 0.9). With reg_eps = 0 the problem therefore gets the Tikhonov term
    delta ||z||^2, delta = n eps on the n x n cosine matrix (trace n): its solutions tend to the
    minimum-norm optimal z as delta -> 0, so z stays bounded. The price, from its KKT conditions
    G y + delta z = mu >= 0: (G y)_k >= -delta z_k, a cosine of at most n eps z_k / ||D||, and at
    a strongly stationary J a residual ||D||^2 <= delta ||z_0||^2 far below the rounding floor
    (measured: 7e-5 of it over 600 random strongly stationary Jacobians, T up to 20).
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
    rows = factor_t.shape[0]
    if reg_eps == 0.0:
        # [L^T; sqrt(delta) I] z ~ [-L^T y0; 0]: the Tikhonov term of the docstring.
        delta = live.size * float(np.finfo(np.float64).eps)
        factor_t = np.vstack([factor_t, math.sqrt(delta) * np.eye(live.size)])
    solutions = targets.copy()
    for row, u in enumerate(targets):
        start = scale * u[live]
        rhs = np.zeros(factor_t.shape[0])
        rhs[:rows] = -(factor_t[:rows] @ start)
        z, _ = nnls(factor_t, rhs, maxiter=50 * gramian.shape[0])
        solutions[row, live] = (start + z) / scale
    return solutions


# Nash-MTL weights beyond this (on the cosine matrix, where they start near 1) have diverged.
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
    vector of M), and then stops after ``max_iterations`` with the last iterate, which may
    conflict with a task (the caller must repair it, see ``NashMTL``).

    Scale: the equation is covariant under rescaling each task. With N = diag(n), n_i = ||g_i||
    and the cosine matrix K = N^-1 M N^-1, beta = N alpha solves beta_i (K beta)_i = 1, so
    Newton runs on K (unit diagonal, whatever the norms) and alpha = beta / n. On M itself,
    norms 1e6 apart already put the Hessian's diagonal 1e12 apart.
    """
    T = gramian.shape[0]
    alpha = np.zeros(T)
    live = np.flatnonzero(np.diag(gramian) > 0)
    if live.size == 0:
        return alpha, True
    sub = gramian[np.ix_(live, live)]
    norms = task_norms(sub)
    M = cosine_matrix(sub, norms)
    x = np.ones(live.size)
    if start is not None and np.isfinite(start[live]).all() and (start[live] > 0).all():
        x = start[live] * norms
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
    alpha[live] = x / norms
    return alpha, converged


# Eigenvalues of the cosine matrix below this fraction of the largest span its numerical null
# space: forming K and its eigendecomposition err by ~T eps relative, 1e-12 leaves a margin of
# 1e3 over that for T <= 10 (and rounds a cancellation to one part in 1e6 of the norms, in
# cosine, to zero).
_NULL_RTOL = 1e-12


def stationary_support(gramian: np.ndarray) -> np.ndarray:
    """The tasks in some vanishing non-negative combination of the gradients (a mask).

    The largest support of {v >= 0 : J^T v = 0}: the union of all such supports is one (the set
    is a convex cone, so the sum of two members is a member). A zero gradient is in it (v = e_i).
    Every direction that conflicts with no task is orthogonal to these gradients: with v > 0 on
    the support, sum_i v_i g_i . D = 0 and no term is negative. Computed on the cosine matrix K
    as one linear program: maximize sum z subject to V0^T v = 0 (V0: eigenvectors of K with
    eigenvalue above ``_NULL_RTOL`` times the largest, so v lies in K's numerical null space),
    0 <= z <= v, z <= 1; then z_i = 1 exactly on the support. Empty when 0 is not in the hull.
    """
    norms = task_norms(gramian)
    support = norms == 0.0
    live = np.flatnonzero(~support)
    k = live.size
    if k < 2:
        return support
    K = cosine_matrix(gramian[np.ix_(live, live)])
    values, vectors = np.linalg.eigh(K)
    keep = values > _NULL_RTOL * float(values[-1])
    if keep.all():
        return support
    eye = np.eye(k)
    result = linprog(
        np.concatenate([np.zeros(k), -np.ones(k)]),
        A_ub=np.hstack([-eye, eye]), b_ub=np.zeros(k),
        A_eq=np.hstack([vectors[:, keep].T, np.zeros((int(keep.sum()), k))]),
        b_eq=np.zeros(int(keep.sum())),
        bounds=[(0.0, None)] * k + [(0.0, 1.0)] * k, method="highs",
    )
    if result.status == 0:
        support[live[result.x[k:] > 0.5]] = True
    return support


def restricted_nash_weights(gramian: np.ndarray, stationary: np.ndarray) -> np.ndarray | None:
    """Nash-MTL's limit when the tasks ``stationary`` (``stationary_support``) cannot improve.

    Every non-conflicting D is orthogonal to g_S (S = ``stationary``), so the bargaining is
    among the other tasks R on their gradients projected onto span(g_S)^perp, P g_r =
    g_r - sum_s X_sr g_s with X = M_SS^+ M_SR (least squares), whose Gramian is the Schur
    complement M_RR - M_RS X. Its solution alpha_R (converged: 0 is not in the projected hull,
    by the maximality of S) gives D = sum_r alpha_r P g_r, i.e. the weights c_R = alpha_R,
    c_S = -X alpha_R, with g_r . D = 1 / alpha_r > 0 and g_s . D = 0. This is where the Newton
    iterates head when the full problem has no solution (alpha_S diverges, D stays bounded).
    Computed on cosines (covariant, as in ``nash_bargaining_weights``). All of S: D = 0 (zero
    weights). Returns None if the restricted problem does not converge either.
    """
    T = gramian.shape[0]
    weights = np.zeros(T)
    norms = task_norms(gramian)
    R = np.flatnonzero(~stationary & (norms > 0))
    S = np.flatnonzero(stationary & (norms > 0))
    if R.size == 0:
        return weights
    K = cosine_matrix(gramian)
    if S.size:
        X = np.linalg.lstsq(K[np.ix_(S, S)], K[np.ix_(S, R)], rcond=1e-12)[0]
        schur = K[np.ix_(R, R)] - K[np.ix_(R, S)] @ X
        schur = 0.5 * (schur + schur.T)
    else:
        X = np.zeros((0, R.size))
        schur = K[np.ix_(R, R)]
    if np.any(np.diag(schur) <= 0.0):
        return None
    beta, converged = nash_bargaining_weights(schur)
    if not converged:
        return None
    weights[R] = beta
    weights[S] = -(X @ beta)
    live = norms > 0
    weights[live] /= norms[live]
    return weights
