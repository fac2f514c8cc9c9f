"""Small convex solvers over the probability simplex, in Gramian form (float64 NumPy).

- ``min_norm_point``: Wolfe's algorithm for the point of smallest norm in the convex hull of
  points given only by their Gramian (MGDA, the tensioner's bases). It is an active-set method:
  on the final support the answer solves a linear system exactly, so the result is exact up to
  rounding, not up to an iteration count.
- ``conflict_averse_solution`` (and ``conflict_averse_weights``): the CAGrad dual, min over
  the simplex of w^T M a + c ||g_a|| sqrt(w^T M w), by an active set of the same kind whose
  faces have a closed form (docs/methods.md#conflict-averse).
- ``dual_cone_weights``: projections onto the dual cone {x : J x >= 0} by NNLS (UPGrad,
  DualProj; docs/methods.md#dual-cone).
- ``nash_bargaining_weights``, ``stationary_support``, ``restricted_nash_weights``: Nash-MTL's
  bargaining equation and its limit at Pareto-stationary points (docs/methods.md#nash_mtl,
  docs/methods.md#stationarity).

Every solver works on the cosine matrix and the norms relative to the largest, never on M with
absolute tolerances, and verifies its KKT conditions on the original Gramian against rounding
bounds derived from the terms that cancel: their guarantees hold for task-gradient norms
spanning 1e12 (``benchmarks/norm_spans.py`` measures the largest span each one holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, linprog, nnls

from .kernels import compiled, numba
from .linalg import cosine_matrix, task_norms

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

    The min-norm point of the convex hull of the gradients: MGDA's problem (Sener & Koltun
    2018, Eq. 3; docs/methods.md#min-norm), also the tensioner's min-norm base.

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

    Implementation: compiled loops (``_min_norm_compiled``) where numba is available, since
    at small T NumPy's per-call cost on (T + 1)-sized arrays was nearly all of MGDA's time; a
    face whose bordered system is singular sends the whole solve to ``_min_norm_numpy``, which
    takes the least-squares minimizer there.
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
    if compiled():
        w, verified = _min_norm_compiled(np.ascontiguousarray(gramian, dtype=np.float64),
                                         np.ascontiguousarray(n), 20 * T + 50)
        if w.size:
            return w, bool(verified)
        # A face whose bordered system is singular (affinely dependent gradients): NumPy's
        # path takes the least-squares minimizer there; it redoes the whole solve.
    return _min_norm_numpy(gramian, n)


def _min_norm_numpy(gramian: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, bool]:
    """``min_norm_solution`` for nonzero norms n, in NumPy (the reference for the compiled
    ``_min_norm_compiled``, which does the same arithmetic without NumPy's per-call cost)."""
    T = gramian.shape[0]
    largest = float(n.max())
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


if numba is not None:

    @numba.njit(cache=True)
    def _violations_into(G, s, w, tolerance_factor, excess):  # pragma: no cover - compiled
        # excess_j = (w^T G w - (G w)_j) - tol_j (``min_norm_solution``); returns w^T G w.
        T = w.size
        Gw = np.zeros(T)
        for j in range(T):
            total = 0.0
            for k in range(T):
                total += G[j, k] * w[k]
            Gw[j] = total
        value = 0.0
        sigma = 0.0
        for k in range(T):
            value += w[k] * Gw[k]
            sigma += w[k] * s[k]
        for j in range(T):
            excess[j] = (value - Gw[j]) - tolerance_factor * (s[j] + sigma) * sigma
        return value

    @numba.njit(cache=True)
    def _lu_solve(A, b):  # pragma: no cover - compiled
        # x with A x = b by Gaussian elimination with partial pivoting (LAPACK's gesv, which
        # NumPy's path calls), in place; an empty array if a pivot is exactly zero (singular).
        m = b.size
        for col in range(m):
            pivot = col
            for row in range(col + 1, m):
                if abs(A[row, col]) > abs(A[pivot, col]):
                    pivot = row
            if A[pivot, col] == 0.0:
                return np.empty(0)
            if pivot != col:
                for j in range(m):
                    A[col, j], A[pivot, j] = A[pivot, j], A[col, j]
                b[col], b[pivot] = b[pivot], b[col]
            for row in range(col + 1, m):
                factor = A[row, col] / A[col, col]
                for j in range(col, m):
                    A[row, j] -= factor * A[col, j]
                b[row] -= factor * b[col]
        x = np.empty(m)
        for row in range(m - 1, -1, -1):
            total = b[row]
            for j in range(row + 1, m):
                total -= A[row, j] * x[j]
            x[row] = total / A[row, row]
        return x

    @numba.njit(cache=True)
    def _affine_compiled(K, s, S):  # pragma: no cover - compiled
        # ``_affine_minimizer`` of the support S (indices into K and s), or an empty array
        # where the bordered system is singular (affinely dependent points): NumPy's path then
        # takes the least-squares solution, which this one leaves to it.
        k = S.size
        if k == 1:
            return np.ones(1)
        smallest = s[S[0]]
        for a in range(k):
            smallest = min(smallest, s[S[a]])
        kkt = np.zeros((k + 1, k + 1))
        for a in range(k):
            for b in range(k):
                kkt[a, b] = K[S[a], S[b]]
            u = smallest / s[S[a]]
            kkt[a, k] = u
            kkt[k, a] = u
        rhs = np.zeros(k + 1)
        rhs[k] = 1.0
        solution = _lu_solve(kkt.copy(), rhs.copy())
        if solution.size == 0:
            return solution  # singular: the caller redoes the solve in NumPy
        largest = 1.0
        worst = 0.0
        for a in range(k + 1):
            largest = max(largest, abs(solution[a]))
            total = 0.0
            for b in range(k + 1):
                total += kkt[a, b] * solution[b]
            worst = max(worst, abs(total - rhs[a]))
        if not worst <= 1e-10 * largest:
            return np.empty(0)  # not solved to the accuracy NumPy's path demands: redo there
        y = np.empty(k)
        total = 0.0
        for a in range(k):
            y[a] = solution[a] / s[S[a]]
            total += y[a]
        if total != 0.0:
            return y / total
        return np.full(k, 1.0 / k)

    @numba.njit(cache=True)
    def _minor_compiled(K, s, w, S):  # pragma: no cover - compiled
        # ``_minor_cycles``: (w, support) at the affine minimizer of a face, or where a weight
        # reached zero on the way with the support reduced to one point.
        T = w.size
        while True:
            k = S.size
            y = _affine_compiled(K, s, S)
            if y.size == 0:
                return y, S  # singular face: the caller falls back to NumPy
            positive = True
            for a in range(k):
                if not y[a] > 0.0:
                    positive = False
            if positive:
                w = np.zeros(T)
                for a in range(k):
                    w[S[a]] = y[a]
                return w, S
            current = np.empty(k)
            for a in range(k):
                current[a] = w[S[a]]
            theta = np.inf
            stop = -1
            for a in range(k):
                if y[a] <= 0.0:
                    ratio = current[a] / (current[a] - y[a])
                    if ratio < theta:
                        theta, stop = ratio, a
            for a in range(k):
                current[a] = current[a] + theta * (y[a] - current[a])
            spread = 0.0
            for a in range(k):
                spread += abs(current[a] * s[S[a]])
            kept = 0
            keep = np.zeros(k, dtype=np.bool_)
            for a in range(k):
                keep[a] = current[a] * s[S[a]] > 1e-15 * spread and a != stop
                if keep[a]:
                    kept += 1
            support = np.empty(kept, dtype=np.int64)
            w = np.zeros(T)
            j = 0
            for a in range(k):
                if keep[a]:
                    support[j] = S[a]
                    w[S[a]] = current[a]
                    j += 1
            w = w / w.sum()
            S = support
            if kept == 1:
                return w, S

    @numba.njit(cache=True)
    def _min_norm_compiled(gramian, n, iterations):  # pragma: no cover - compiled
        # ``_min_norm_numpy``, for T >= 2 gradients of nonzero norm n, as compiled loops.
        T = n.size
        largest = n.max()
        K = np.empty((T, T))
        for i in range(T):
            for j in range(T):
                K[i, j] = min(max(gramian[i, j] / (n[i] * n[j]), -1.0), 1.0)
            K[i, i] = 1.0
        s = n / largest
        G = np.empty((T, T))
        for i in range(T):
            for j in range(T):
                G[i, j] = K[i, j] * (s[i] * s[j])
        tolerance_factor = 4.0 * (T + 2) * 2.220446049250313e-16
        excess = np.empty(T)
        if T == 2:
            w = _segment_compiled(G)
            _violations_into(G, s, w, tolerance_factor, excess)
            return w, excess.max() <= 0.0
        first = 0
        for i in range(T):
            if s[i] < s[first]:
                first = i
        w = np.zeros(T)
        w[first] = 1.0
        support = np.array([first], dtype=np.int64)
        best = _violations_into(G, s, w, tolerance_factor, excess)
        candidate_excess = np.empty(T)
        for _ in range(iterations):
            if excess.max() <= 0.0:
                return w, True
            # The most violated constraint relative to its task's norm (scale-free choice).
            entering = 0
            for i in range(T):
                if excess[i] / s[i] > excess[entering] / s[entering]:
                    entering = i
            inside = False
            for a in range(support.size):
                if support[a] == entering:
                    inside = True
            if inside:
                break
            grown = np.empty(support.size + 1, dtype=np.int64)
            grown[:support.size] = support
            grown[support.size] = entering
            candidate, candidate_support = _minor_compiled(K, s, w, grown)
            if candidate.size == 0:
                return candidate, False  # singular face: the caller falls back to NumPy
            value = _violations_into(G, s, candidate, tolerance_factor, candidate_excess)
            if value >= best:
                break  # rounding has stalled the active set; keep the best point found
            w, support, best = candidate, candidate_support, value
            excess[:] = candidate_excess
        return w, excess.max() <= 0.0

    @numba.njit(cache=True)
    def _segment_compiled(G):  # pragma: no cover - compiled
        # ``_segment_min_norm``.
        curvature = G[0, 0] + G[1, 1] - 2.0 * G[0, 1]
        w = np.zeros(2)
        if curvature <= 0.0:
            first = 1.0 if G[0, 0] <= G[1, 1] else 0.0
            w[0], w[1] = first, 1.0 - first
            return w
        first = (G[1, 1] - G[0, 1]) / curvature
        if first <= 0.0:
            w[1] = 1.0
            return w
        second = (G[0, 0] - G[0, 1]) / curvature
        if second <= 0.0:
            w[0] = 1.0
            return w
        w[0], w[1] = first / (first + second), second / (first + second)
        return w


# A squared norm below this many times its rounding error (gamma_T times the squared length of
# its terms) is not resolved by M: its relative error would exceed 1e-3.
_UNRESOLVED = 1e3


@dataclass(frozen=True)
class ConflictAverseSolution:
    """The solution of the CAGrad dual (``conflict_averse_solution``).

    ``weights``: w* on the simplex; ``gw_norm``: ||g_w*|| (0 when the optimum is a vanishing
    combination of the gradients, where the direction g_w / ||g_w|| is undefined);
    ``anchor_norm``: ||g_a||; ``verified``: w* passed the KKT test on the original Gramian
    (False only when rounding stalled both the active set and its fallback: w* is then the best
    point found, not certified optimal).
    """

    weights: np.ndarray
    gw_norm: float
    anchor_norm: float
    verified: bool


def conflict_averse_weights(
    gramian: np.ndarray, anchor: np.ndarray, c: float
) -> tuple[np.ndarray, float, float]:
    """(w*, ||g_w*||, ||g_a||) of ``conflict_averse_solution``, its verification flag dropped."""
    solution = conflict_averse_solution(gramian, anchor, c)
    return solution.weights, solution.gw_norm, solution.anchor_norm


def conflict_averse_solution(
    gramian: np.ndarray, anchor: np.ndarray, c: float
) -> ConflictAverseSolution:
    """Solve the CAGrad dual for the ball around g_a = J^T a of radius r = c ||g_a||.

    w* minimizes F(w) = g_w . g_a + r ||g_w|| over the simplex, g_w = J^T w (CAGrad, Liu et al.
    2021: the dual of Eq. 3, Sec. 3.1 and Algorithm 1; docs/methods.md#conflict-averse). The
    update is D = g_a + (r / ||g_w*||) g_w*, and the primal value min_i g_i . D equals F(w*).

    Optimality (KKT). dF/dw_i = g_i . D and w . grad F = F (F is positively homogeneous), so
    w* is optimal iff g_i . D >= F(w*) for every task, with equality on the support: the
    support holds the tasks of least improvement, and D leans towards a convex combination of
    them. Two facts make it exact over any spread of the norms:

    - Scale. F is not invariant under rescaling one task (the simplex and g_a are not), only
      under rescaling M by a scalar. Everything is therefore computed from the cosine matrix K
      and the norms s_i = n_i / max n, in the shares z = s * w (the length each gradient
      contributes to g_w): g_w = sum_i z_i u_i with unit u_i, so ||g_w||^2 = z^T K z is as well
      conditioned as the cosines, whatever the norms. (The previous root find on M / max M_ii
      could not resolve ||g_w|| below 1e-6 of the largest norm: with norms spanning more than
      ~1e6 the small tasks' share of the optimum fell below it.)
    - Faces. On the affine hull of a face S the optimum has a closed form: with x0 the point of
      least norm of aff(g_S) and p the projection of g_a onto its directions L, F(x) =
      x . g_a + r ||x|| is minimized at x* = x0 - p ||x0|| / sqrt(r^2 - ||p||^2) when
      ||p|| < r, and is unbounded below along -p otherwise. Both come from one bordered system
      [[K_SS, v], [v^T, 0]] (v_i = min_S s / s_i) with two right-hand sides, scaled like the
      cosines.

    Method: an active set in the manner of Wolfe's min-norm algorithm (``min_norm_solution``).
    From the full face's optimum, if it is interior, else from the best vertex: add the task
    that violates the KKT test most (relative to its norm), move towards the new face's optimum
    (or along its descent ray) until a weight reaches zero, drop it, repeat. F decreases strictly
    at every step (it is convex and the new task is a descent direction), so no face recurs and
    the loop ends; each face costs one (|S| + 1)^2 solve.

    Verification, on the original M (scaled by a scalar only). Let tau = sum_k w_k n_k (the
    length of the terms of g_w), rho = tau / ||g_w|| and kappa = sum_k |a_k| n_k / ||g_a|| (how
    much g_w and g_a cancel) and sigma = sum_k |a_k| n_k + r rho (the terms that cancel in D).
    Forming g_i . D and F errs by at most gamma_T (n_i + tau) sigma; ||g_w||^2 and ||g_a||^2
    formed from M err by gamma_T rho^2 and gamma_T kappa^2 relative, which scales the step
    r g_w / ||g_w|| and moves g_i . D - F by gamma_T r (rho^2 + kappa^2) (n_i + ||g_w||). With
    gamma_T = 4 (T + 2) eps (as in ``rounding_bounds``) w passes when, for every task i,

        g_i . D >= F(w) - gamma_T ((n_i + tau) sigma + r (rho^2 + kappa^2) (n_i + ||g_w||)),

    and on the support equality holds by construction (each face is solved exactly). A point
    passing it is within sum_i w*_i tol_i of the optimal value (convexity).

    Degenerate case. When ||g_w|| cannot be resolved from M (||g_w||^2 below 1e3 gamma_T tau^2:
    g_w cancels to rounding), the hull of the gradients contains 0 to rounding and F = 0 there.
    For c >= 1, F >= ||g_w|| (r - ||g_a||) >= 0 everywhere, so that point is optimal
    (``gw_norm`` 0, docs/methods.md#stationarity). For c < 1 F may be negative elsewhere; then,
    and whenever rounding stalls the active set, a root find on the shifted min-norm problems
    (min over w of ||g_w + (lam / r) g_a||, whose solution has ||g_w|| = lam at the optimum lam)
    locates the optimum's face from which the active set starts again. If no lam > 0 has
    ||g_w(lam)|| > lam, the optimum is the vanishing combination (``gw_norm`` 0).
    A zero gradient is such a combination too: its vertex has F = 0.
    """
    T = gramian.shape[0]
    n = task_norms(gramian)
    largest = float(n.max())
    uniform = np.full(T, 1.0 / T)
    if largest == 0.0:
        return ConflictAverseSolution(uniform, 0.0, 0.0, True)
    s = n / largest
    K = cosine_matrix(gramian, n)
    shares = anchor * s
    beta = K @ shares  # beta_i = u_i . g_a (in units of the largest norm)
    anchor_sq = max(float(shares @ beta), 0.0)
    anchor_norm = math.sqrt(anchor_sq) * largest
    anchor_l1 = float(np.abs(shares).sum())
    if c == 0.0 or anchor_sq <= _UNRESOLVED * _dual_gamma(T) * anchor_l1 * anchor_l1:
        # The ball is the single point g_a (c = 0), or g_a cancels to rounding: its norm, hence
        # the radius, is not resolved by M (anchor_sq errs by gamma_T anchor_l1^2).
        return ConflictAverseSolution(uniform, 0.0, anchor_norm, True)
    radius = c * math.sqrt(anchor_sq)
    live = np.flatnonzero(n > 0.0)
    zero = np.flatnonzero(n == 0.0)
    if zero.size and c >= 1.0:
        return ConflictAverseSolution(_vertex(T, int(zero[0])), 0.0, anchor_norm, True)
    dual = _ConflictAverseDual(K[np.ix_(live, live)], s[live], beta[live], radius, anchor_l1,
                               anchor_sq, c)
    w_live, gw_norm, value, verified = dual.optimum()
    if zero.size and (gw_norm == 0.0 or value >= 0.0):
        # Mixing in a zero gradient scales F by (1 - t): its vertex (F = 0) wins unless F < 0.
        return ConflictAverseSolution(_vertex(T, int(zero[0])), 0.0, anchor_norm, True)
    w = np.zeros(T)
    w[live] = w_live
    return ConflictAverseSolution(w, gw_norm * largest, anchor_norm, verified)


def _dual_gamma(T: int) -> float:
    """gamma_T = 4 (T + 2) eps: the rounding bound of a T-term sum and one more (as in
    ``rounding_bounds``), for the CAGrad dual's KKT test and its resolution cuts."""
    return 4.0 * (T + 2) * _EPS


def _vertex(T: int, i: int) -> np.ndarray:
    w = np.zeros(T)
    w[i] = 1.0
    return w


@dataclass(frozen=True)
class _DualPoint:
    """A point of the CAGrad dual: F (``value``), ||g_w|| (0 if unresolved) and, where g_w is
    resolved, the excess of each KKT condition over its rounding bound (> 0: violated)."""

    weights: np.ndarray
    value: float
    xnorm: float
    excess: np.ndarray | None


class _ConflictAverseDual:
    """F(w) = w . b + r ||g_w|| on the live tasks, from cosines K and norms s (max s = 1)."""

    def __init__(self, K: np.ndarray, s: np.ndarray, beta: np.ndarray, radius: float,
                 anchor_l1: float, anchor_sq: float, c: float) -> None:
        self.K, self.s, self.beta = K, s, beta
        self.radius, self.anchor_l1, self.anchor_sq, self.c = radius, anchor_l1, anchor_sq, c
        self.gamma = _dual_gamma(s.size)

    def point(self, w: np.ndarray) -> _DualPoint:
        z = w * self.s
        Kz = self.K @ z
        xsq = float(z @ Kz)
        tau = float(z.sum())
        if xsq <= _UNRESOLVED * self.gamma * tau * tau:
            return _DualPoint(w, float(z @ self.beta), 0.0, None)
        xnorm = math.sqrt(xsq)
        along = self.beta + (self.radius / xnorm) * Kz  # u_i . D
        value = float(z @ along)  # F(w) = sum_i w_i g_i . D
        rho = tau / xnorm
        sigma = self.anchor_l1 + self.radius * rho
        spread = rho * rho + self.anchor_l1 * self.anchor_l1 / self.anchor_sq
        tol = self.gamma * ((self.s + tau) * sigma + self.radius * spread * (self.s + xnorm))
        return _DualPoint(w, value, xnorm, (value - self.s * along) - tol)

    def face(self, S: np.ndarray) -> tuple[np.ndarray, bool]:
        """(weights of the optimum on aff(face S), True), or (a descent ray, False) if F is
        unbounded below there; see ``conflict_averse_solution``. The weights sum to 1, the
        ray to 0."""
        k = S.size
        if k == 1:
            return np.ones(1), True
        sS = self.s[S]
        v = float(sS.min()) / sS
        KS = self.K[np.ix_(S, S)]
        system = np.zeros((k + 1, k + 1))
        system[:k, :k] = KS
        system[:k, k] = v
        system[k, :k] = v
        rhs = np.zeros((k + 1, 2))
        rhs[k, 0] = 1.0
        rhs[:k, 1] = self.beta[S]
        solution = _bordered_solve(system, rhs)
        # z0: shares of the least-norm point of aff(g_S) (sum_i z0_i v_i = 1); zeta: shares of
        # the projection p of g_a onto the directions of aff(g_S) (sum_i zeta_i v_i = 0).
        z0, zeta = solution[:k, 0], solution[:k, 1]
        x0_sq = max(float(z0 @ KS @ z0), 0.0)
        p_sq = max(float(zeta @ KS @ zeta), 0.0)
        slack = self.radius * self.radius - p_sq
        if slack <= 0.0:
            return -zeta * v, False
        tau0 = float(np.abs(z0).sum())
        if x0_sq <= _UNRESOLVED * self.gamma * tau0 * tau0:
            # x0 = 0 to rounding (0 is in aff(g_S)): x* = x0. The square root would turn the
            # rounding of x0_sq (~ eps tau0^2) into a spurious step of sqrt(eps) tau0 along p.
            return z0 * v, True
        return (z0 - zeta * math.sqrt(x0_sq / slack)) * v, True

    def minor_cycles(self, w: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Move w towards the optimum of its face, dropping tasks whose weight reaches 0."""
        S = support
        current = w[S]
        while True:
            y, bounded = self.face(S)
            if bounded and np.all(y > 0.0):
                current = y
                break
            direction = y - current if bounded else y
            blocked = np.flatnonzero(y <= 0.0) if bounded else np.flatnonzero(direction < 0.0)
            if blocked.size == 0:
                break  # a ray along which no weight falls: rounding noise, stop here
            ratios = current[blocked] / -direction[blocked]
            theta = float(np.min(ratios))
            moved = current + theta * direction
            # Ties reach zero together; what rounding leaves of them is not a weight.
            keep = moved > 4.0 * _EPS * current
            keep[blocked[int(np.argmin(ratios))]] = False
            if not keep.any():
                break
            S, current = S[keep], moved[keep]
            if S.size == 1:
                current = np.ones(1)
                break
        w = np.zeros_like(w)
        w[S] = current / current.sum()
        return w, S

    def descend(self, w: np.ndarray, support: np.ndarray, at_face_optimum: bool
                ) -> tuple[_DualPoint, bool]:
        """Active-set iterations from w: (the last point, whether it passed the KKT test)."""
        S = support
        if not at_face_optimum:
            w, S = self.minor_cycles(w, S)
        point = self.point(w)
        for _ in range(20 * self.s.size + 50):
            if point.excess is None:
                return point, False
            if point.excess.max() <= 0.0:
                return point, True
            # The most violated condition relative to its task's norm (a scale-free choice).
            entering = int(np.argmax(point.excess / self.s))
            if entering in S:
                break
            w, S = self.minor_cycles(point.weights, np.append(S, entering))
            candidate = self.point(w)
            if candidate.value >= point.value:
                break  # rounding has stalled the active set: keep the best point found
            point = candidate
        return point, False

    def start(self) -> tuple[np.ndarray, np.ndarray]:
        """The full face's optimum if it is interior, else the vertex of least F."""
        everything = np.arange(self.s.size)
        y, bounded = self.face(everything)
        if bounded and np.all(y > 0.0):
            return y / y.sum(), everything
        best = int(np.argmin(self.s * (self.beta + self.radius)))  # F(e_i)
        return _vertex(self.s.size, best), np.array([best])

    def optimum(self) -> tuple[np.ndarray, float, float, bool]:
        """(w*, ||g_w*|| (0: a vanishing combination), F(w*), verified)."""
        w, S = self.start()
        point, verified = self.descend(w, S, at_face_optimum=True)
        if verified:
            return point.weights, point.xnorm, point.value, True
        if point.excess is None and self.c >= 1.0:
            return point.weights, 0.0, 0.0, True
        guess = self.root_guess()
        if guess is None:
            if point.excess is None:
                return point.weights, 0.0, 0.0, True
            return point.weights, point.xnorm, point.value, False
        polished, verified = self.descend(guess, np.flatnonzero(guess > 0.0),
                                          at_face_optimum=False)
        if polished.excess is not None and (verified or point.excess is None
                                            or polished.value < point.value):
            return polished.weights, polished.xnorm, polished.value, verified
        if point.excess is None:
            return point.weights, 0.0, 0.0, False
        return point.weights, point.xnorm, point.value, False

    def root_guess(self) -> np.ndarray | None:
        """The weights near the optimum lam* = ||g_w*|| of the shifted min-norm problems, or
        None if ||g_w(lam)|| <= lam for every lam down to 1e-8 of the smallest norm.

        F(w) = min over lam > 0 of w . b + (r / 2)(||g_w||^2 / lam + lam); for fixed lam the
        minimizer is the min-norm point of {g_i + (lam / r) g_a}, and ||g_w(lam)|| / lam is
        non-increasing (the partial minimum is convex in lam), so lam* is the one crossing of
        ||g_w(lam)|| / lam = 1, bracketed on a log scale.
        """
        G = self.K * np.outer(self.s, self.s)
        b = self.s * self.beta

        def weights_at(log_lam: float) -> np.ndarray:
            t = math.exp(log_lam) / self.radius
            shifted = G + t * (b[:, None] + b[None, :]) + (t * t) * self.anchor_sq
            return min_norm_point(shifted)

        def excess_ratio(log_lam: float) -> float:
            z = weights_at(log_lam) * self.s
            return math.sqrt(max(float(z @ self.K @ z), 0.0)) / math.exp(log_lam) - 1.0

        step = math.log(100.0)
        floor = math.log(1e-8) + math.log(float(self.s.min()))  # no underflow for tiny s
        high = 0.0  # lam = max s >= ||g_w||: the ratio is <= 0 there
        while excess_ratio(high - step) <= 0.0:
            high -= step
            if high - step < floor:
                return None
        try:
            root = brentq(excess_ratio, high - step, high, xtol=1e-6, maxiter=100)
        except ValueError:  # rounding put the ratio at lam = max s above 0: the root is there
            root = high
        return weights_at(root)


def _bordered_solve(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve the bordered face system; least squares (the smallest solution) if singular.

    Singular means affinely dependent gradients on the face: every solution gives the same
    points x0 and p, so the smallest is as good as any and the best conditioned.
    """
    try:
        solution = np.linalg.solve(system, rhs)
        residual = float(np.max(np.abs(system @ solution - rhs)))
        if np.isfinite(solution).all() and residual <= 1e-10 * max(
                1.0, float(np.abs(solution).max())):
            return solution
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(system, rhs, rcond=1e-13)[0]


def dual_cone_weights(gramian: np.ndarray, targets: np.ndarray, reg_eps: float = 0.0) -> np.ndarray:
    """For each row u of ``targets``, v*(u) = argmin over v >= u of v^T M v (rows of the result).

    J^T v*(u) is the projection of J^T u onto the dual cone {x : J x >= 0} (UPGrad, DualProj:
    Quinton & Rey 2024; docs/methods.md#dual-cone). The problem is covariant under rescaling
    each task: with N = diag(s), v*(u) for M is N^-1 y*(N u) for N^-1 M N^-1. With reg_eps = 0
    it is solved on the cosine matrix (s = gradient norms), which stays accurate when norms
    differ by orders of magnitude
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
    sub = gramian if live.size == len(diagonal) else gramian[np.ix_(live, live)]
    G = sub / np.outer(scale, scale)
    if reg_eps:
        G += reg_eps * np.eye(live.size)
    # z = 0 is optimal exactly when G y0 >= 0 (the KKT conditions at z = 0; the Tikhonov term
    # adds nothing there): a target that conflicts with no task is its own projection. Most
    # targets of UPGrad are (u = p_i e_i: task i's gradient conflicts with none), and they
    # need no factorization.
    starts = targets[:, live] * scale
    pending = np.flatnonzero((starts @ G < 0.0).any(axis=1))
    if pending.size == 0:
        return targets
    values, vectors = np.linalg.eigh(G)
    keep = values > 1e-14 * max(float(values[-1]), 0.0)
    factor_t = (vectors[:, keep] * np.sqrt(values[keep])).T  # L^T with G = L L^T, r x live
    rows = factor_t.shape[0]
    if reg_eps == 0.0:
        # [L^T; sqrt(delta) I] z ~ [-L^T y0; 0]: the Tikhonov term of the docstring.
        delta = live.size * _EPS
        factor_t = np.vstack([factor_t, math.sqrt(delta) * np.eye(live.size)])
    solutions = targets.copy()
    for row in pending:
        start = starts[row]
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

    Nash-MTL's bargaining solution (Navon et al., ICML 2022; docs/methods.md#nash_mtl). It
    minimizes the convex f(alpha) = alpha^T M alpha / 2 - sum_i log alpha_i, whose gradient is
    M alpha - 1/alpha: damped Newton steps (Hessian M + diag(1 / alpha^2)) with backtracking
    that keeps alpha > 0. Tasks with zero gradient get alpha_i = 0. Returns (alpha, converged);
    it does not converge when the hull of the gradients contains 0 (Pareto-stationary: alpha
    diverges along a null vector of M), and then stops after ``max_iterations`` with the last
    iterate, which may conflict with a task (the caller must repair it, see ``NashMTL``).

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

    Weak Pareto-stationarity restricted to a set of tasks (docs/methods.md#stationarity).

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
