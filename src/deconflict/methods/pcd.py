"""PCD: Priority-Constrained Descent ("Not All Objectives Are Born Equal: Priority-Constrained
Descent for Hierarchical Multi-Objective Optimization", TMLR 2026, arXiv:2606.29521;
docs/methods.md#pcd).

The first task is the primary objective; every other task j >= 2 is guaranteed a fraction tau_j
of the first-order progress its own normalized gradient would give. With the normalized
gradients g~_i = s_i g_i, s_i = 1 / sqrt(vhat_i + eps), where vhat_i is the bias-corrected
exponential moving average (decay beta) of ||g_i||^2 over the steps,

    d~ = argmin_d 1/2 ||d - g~_1||^2   s.t.   g~_j . d >= tau_j ||g~_j||^2   (j >= 2),

and the update is d~ rescaled to ||g_1||. The KKT conditions give d~ = g~_1 + sum_j mu_j g~_j
with mu >= 0 the multipliers, i.e. weights w = [1, mu] on the g~_i, and mu solves the dual, a
bound-constrained convex QP on the normalized Gramian K = S M S (S = diag(s)):

    min_{mu >= 0} 1/2 mu^T K_s mu - b^T mu,   K_s = K[1:, 1:],  b = tau diag(K_s) - K[1:, 0].

The task weights are c = s * w * ||g_1|| / ||d~|| (||d~||^2 = w^T K w), so D = J^T c.

Exact solve (not TorchJD's). With x = d - g~_1 the problem is a least-distance program, min
||x|| s.t. A x >= b (rows of A the secondary g~_j), which Lawson & Hanson (Solving Least Squares
Problems, 1974, Ch. 23) reduce to one non-negative least-squares problem: u = argmin_{u >= 0}
||E u - f||, E = [A^T; b^T], f = (0, ..., 0, 1). In Gramian form only E^T E = K_s + b b^T and
E^T f = b are needed, so E is replaced by [R; b^T] with R^T R = K_s (R from an
eigendecomposition: a singular K_s is fine, eigenvalues below its rounding dropped) and scipy's
Lawson-Hanson ``nnls`` solves it; zero secondary gradients (the constraint 0 >= 0, mu_j = 0) are
left out, as their rounding-noise columns derail NNLS. At its optimum the residual's last entry
is rho = 1 - b^T u = ||E u - f||^2; rho = 0 means the constraints are infeasible (the dual is
unbounded), otherwise mu = u / rho. K is first divided by its largest diagonal entry, which
leaves mu unchanged. The multipliers are then polished by a least-squares solve on their
support and the result is checked on the original M: every constraint s_j (M c~)_j >= tau_j
s_j^2 M_jj (c~ = s * w) and complementarity hold to 1e-9 of the size of their terms
(``kkt_residual`` in the diagnostics).

Special cases (as TorchJD's): g_1 = 0 gives a zero update; infeasible constraints (possible from
T = 3, e.g. two anti-parallel secondary gradients with tau > 0) are dropped, d~ = g~_1 (the update
is g_1) and diagnostics["feasible"] is False; a negligible d~ (tau = 0 with g_2 = -g_1, a strongly
stationary J) gives a zero update. The moving average is updated before the weights are computed
(also on those steps). A change in the number of tasks raises ``ShapeError`` (TorchJD silently
restarts the average): call ``reset()``.

Not symmetric in the tasks (the first is primary); not homogeneous with eps > 0 (the
normalization is scale free only at eps = 0, where D(sJ) = s D(J)); not non-conflicting (the
update can conflict with g_1 when a constraint pulls against it, and with the secondaries when
the constraints are infeasible).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import nnls

from ..errors import InvalidOptionError, ShapeError
from ..linalg import negligible_update
from ._zero_update import note_zero_update
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register
from .state import NUMBER, StateField

_EPS = float(np.finfo(np.float64).eps)
# rho = 1 - b^T u at or below this (K normalized to a unit largest diagonal entry): infeasible.
# rho's rounding error is a few eps times (1 + |b|^T u); 1e-12 leaves a wide margin above it.
_INFEASIBLE_RHO = 1e-12
# Relative tolerance of the KKT check on the original M.
_KKT_RTOL = 1e-9


def _nnls_multipliers(K: np.ndarray, taus: np.ndarray) -> tuple[np.ndarray, bool]:
    """mu >= 0 minimizing 1/2 mu^T K_s mu - b^T mu, and whether it is bounded (feasible).

    K is the normalized Gramian (primary task first); the least-distance program is solved by
    Lawson & Hanson's reduction to NNLS (module docstring).
    """
    Ks = K[1:, 1:]
    b = taus * np.diag(Ks) - K[1:, 0]
    n = Ks.shape[0]
    if n == 0:
        return np.zeros(0), True
    values, vectors = np.linalg.eigh(Ks)
    # Eigenvalues below the rounding of K_s (n eps of the largest) are noise: their rows of R
    # would be of order sqrt(eps), spurious independent directions that derail NNLS.
    keep = values > n * _EPS * max(float(values[-1]), 0.0)
    R = np.sqrt(values[keep])[:, None] * vectors[:, keep].T  # R^T R = K_s to rounding
    E = np.vstack([R, b[None, :]])
    f = np.zeros(E.shape[0])
    f[-1] = 1.0
    u, _ = nnls(E, f, maxiter=50 * (n + 1))
    rho = 1.0 - float(b @ u)
    if not rho > _INFEASIBLE_RHO * (1.0 + float(np.abs(b) @ u)):
        return np.zeros(n), False
    mu = u / rho
    return _polish(Ks, b, mu), True


def _polish(Ks: np.ndarray, b: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Re-solve K_s[A, A] mu_A = b_A on the support A of mu (the active constraints hold with
    equality there), kept only if the solution stays non-negative and lowers the KKT residual."""
    support = np.flatnonzero(mu > 0.0)
    if support.size == 0:
        return mu
    refined = mu.copy()
    refined[support] = np.linalg.lstsq(Ks[np.ix_(support, support)], b[support], rcond=None)[0]
    if (refined[support] < 0.0).any():
        return mu
    return refined if _dual_residual(Ks, b, refined) < _dual_residual(Ks, b, mu) else mu


def _dual_residual(Ks: np.ndarray, b: np.ndarray, mu: np.ndarray) -> float:
    """Largest violation of the dual KKT conditions (slack >= 0, mu_j slack_j = 0), relative."""
    slack = Ks @ mu - b
    size = np.abs(Ks) @ np.abs(mu) + np.abs(b) + _EPS
    violation = np.maximum(-slack, 0.0) + np.where(mu > 0.0, np.abs(slack), 0.0)
    return float(np.max(violation / size)) if slack.size else 0.0


def kkt_residual(M: np.ndarray, c_tilde: np.ndarray, s: np.ndarray, taus: np.ndarray) -> float:
    """The KKT check on the original M for d~ = J^T c~ (c~ = s * [1, mu]).

    Constraint j >= 2: g~_j . d~ = s_j (M c~)_j >= tau_j s_j^2 M_jj; complementarity:
    mu_j (g~_j . d~ - tau_j ||g~_j||^2) = 0. Violations relative to the size of the terms.

    >>> import numpy as np
    >>> M = np.array([[1.0, -0.5], [-0.5, 1.0]])  # constraint of task 2 active at tau = 0.5
    >>> kkt_residual(M, np.array([1.0, 1.0]), np.ones(2), np.array([0.5]))
    0.0
    """
    Mc = M @ c_tilde
    slack = s[1:] * Mc[1:] - taus * s[1:] ** 2 * np.diag(M)[1:]
    size = s[1:] * (np.abs(M) @ np.abs(c_tilde))[1:] + taus * s[1:] ** 2 * np.diag(M)[1:] + 1e-300
    mu = c_tilde[1:]
    violation = np.maximum(-slack, 0.0) + np.where(mu > 0.0, np.abs(slack), 0.0)
    return float(np.max(violation / size)) if slack.size else 0.0


@register
class PCD(GramianWeighting):
    """PCD (TMLR 2026): follow the primary (first) task's normalized gradient as closely as
    possible while every other task keeps a fraction tau of its normalized first-order progress;
    see the module docstring.

    Options: ``tau`` in [0, 1], one for every secondary task or a list of T - 1 (default 0.02),
    ``beta`` in [0, 1) the decay of the moving average of ||g_i||^2 (0.999), ``eps`` >= 0
    (1e-8); TorchJD's defaults. State: ``second_moment`` (the moving average, T) and ``steps``.
    Diagnostics: ``feasible`` (False: the constraints were dropped), ``multipliers`` (mu, T - 1),
    ``scales`` (s), ``kkt_residual`` (the check on M, 0 where no QP was solved), ``solved``
    (that residual <= 1e-9) and ``zero_update`` (None, "stationary", "primary_zero",
    "cancelled").

    Two tasks at 120 degrees, tau = 0.5 (first step: s_i = 1 / ||g_i|| up to eps): the
    constraint of task 2 is active, d~ = g~_1 + g~_2, rescaled to ||g_1|| = 1:

    >>> import numpy as np
    >>> M = np.array([[1.0, -0.5], [-0.5, 1.0]])
    >>> [round(x, 6) for x in PCD(tau=0.5, eps=0.0).weights(M).tolist()]
    [1.0, 1.0]
    """

    name = "pcd"
    summary = "Primary task first: closest to its gradient with progress guaranteed to the rest"
    paper = ("Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical "
             "Multi-Objective Optimization, TMLR 2026 (arXiv:2606.29521)")
    family = "multi-objective"
    stateful = True

    OPTIONS = (
        Option("tau", "float", 0.02, "fraction of normalized first-order progress guaranteed "
               "to each secondary task (one value, or one per secondary task)", low=0.0,
               high=1.0, shape="scalar_or_list"),
        Option("beta", "float", 0.999, "decay of the moving average of the squared gradient "
               "norms", low=0.0, high=1.0, high_open=True),
        Option("eps", "float", 1e-8, "added to the moving average before its inverse square "
               "root", low=0.0),
    )

    STATE = (StateField("second_moment"), StateField("steps", NUMBER))

    tau: float | tuple[float, ...]
    beta: float
    eps: float
    second_moment: np.ndarray | None
    steps: int

    def __init__(self, tau: float | tuple[float, ...] = 0.02, beta: float = 0.999,
                 eps: float = 1e-8) -> None:
        self._set_options(tau=tau, beta=beta, eps=eps)

    def _taus(self, T: int) -> np.ndarray:
        if isinstance(self.tau, tuple):
            if len(self.tau) != T - 1:
                raise InvalidOptionError(f"{self.name}: tau has {len(self.tau)} values for "
                                         f"{T - 1} secondary tasks")
            return np.array(self.tau, dtype=np.float64)
        return np.full(T - 1, self.tau)

    def _scales(self, norms_sq: np.ndarray) -> np.ndarray:
        """Update the moving average with ||g_i||^2 and return s_i = 1 / sqrt(vhat_i + eps)."""
        if self.second_moment is None:
            self.second_moment = np.zeros_like(norms_sq)
            self.steps = 0
        elif self.second_moment.shape != norms_sq.shape:
            raise ShapeError(f"{self.name}: the number of tasks changed from "
                             f"{self.second_moment.shape[0]} to {norms_sq.shape[0]}; call "
                             "reset() first")
        self.second_moment = self.beta * self.second_moment + (1.0 - self.beta) * norms_sq
        self.steps += 1
        vhat = self.second_moment / (1.0 - self.beta ** self.steps)
        root = np.sqrt(vhat + self.eps)
        # A zero root: that gradient has always been zero (eps = 0); its scale is irrelevant.
        return np.divide(1.0, root, out=np.zeros_like(root), where=root > 0.0)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        T = M.shape[0]
        taus = self._taus(T)
        s = self._scales(np.diag(M).copy())
        diagnostics: Diagnostics = {"feasible": True, "multipliers": np.zeros(T - 1),
                                    "scales": s.copy(), "kkt_residual": 0.0,
                                    "solved": True}
        c = np.zeros(T)
        if M[0, 0] > 0.0 and s[0] > 0.0:
            K = M * np.outer(s, s)
            w = np.zeros(T)
            w[0] = 1.0
            if T > 1:
                top = float(np.max(np.diag(K)))
                # A zero secondary gradient has the constraint 0 >= 0 (always met, mu_j = 0);
                # its zero column would only be rounding noise to NNLS.
                live = np.flatnonzero(np.diag(K)[1:] > 0.0)
                rows = np.append(0, live + 1)
                mu = np.zeros(T - 1)
                mu[live], feasible = _nnls_multipliers(K[np.ix_(rows, rows)] / top, taus[live])
                diagnostics["feasible"] = feasible
                if feasible:
                    w[1:] = mu
                    diagnostics["multipliers"] = mu.copy()
                    residual = kkt_residual(M, s * w, s, taus)
                    diagnostics["kkt_residual"] = residual
                    diagnostics["solved"] = residual <= _KKT_RTOL
            if not w[1:].any():
                c[0] = 1.0  # d~ = g~_1, rescaled to ||g_1||: g_1 exactly, without rounding
            elif not negligible_update(K, w):
                c = s * w * math.sqrt(M[0, 0] / float(w @ K @ w))
        if M[0, 0] > 0.0:
            note_zero_update(self, M, c, diagnostics, "cancelled",
                             "the constraints of the secondary tasks cancel the primary "
                             "task's normalized gradient (tau = 0)")
        else:
            note_zero_update(self, M, c, diagnostics, "primary_zero",
                             "the primary (first) task's gradient is zero, and PCD follows "
                             "only that task")
        return c, diagnostics
