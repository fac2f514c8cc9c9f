"""FairGrad: alpha-fair resource allocation between tasks (Ban & Ji, "Fair Resource Allocation
in Multi-Task Learning", ICML 2024; docs/methods.md#fairgrad).

The update d maximizes the alpha-fair utility sum_i (g_i . d)^(1 - alpha) / (1 - alpha) (log for
alpha = 1) over a ball. Writing d = J^T w, its optimality conditions are (Eq. 4)

    (M w)_i = w_i^(-1/alpha),   w > 0,

so every task improves: g_i . d = w_i^(-1/alpha) > 0. alpha = 1 is proportional fairness
(Nash-MTL's equation w_i (M w)_i = 1), alpha -> infinity approaches max-min fairness (MGDA's
direction), alpha -> 0 approaches the sum of the gradients.

Exact solve. The equation is the stationarity condition of the strictly convex function

    F(w) = 1/2 w^T M w - sum_i psi(w_i),   psi'(w) = w^(-1/alpha)

(psi(w) = w^p / p with p = 1 - 1/alpha, log w for alpha = 1) on w > 0, whose Hessian
M + diag(w^(-1/alpha - 1) / alpha) is positive definite even where M is singular. It is solved
in cosine form, which makes it independent of the gradient norms' spread: with n_i = ||g_i|| /
max_j ||g_j||, the cosine matrix K and beta = N w, (K beta)_i = n_i^(1/alpha - 1)
beta_i^(-1/alpha) for M / max_j M_jj, and M = s M~ maps back exactly by
w = s^(-alpha / (alpha + 1)) w~. Damped Newton (Cholesky of the Hessian) moves along
beta exp(t step / beta), a step in log beta that keeps the weights positive and crosses orders
of magnitude in few steps (at most e^5 per weight), with t halved until F decreases (Armijo)
or, once F's changes are below its rounding, the residual does. It starts from the solution
for orthogonal gradients, w_i = M_ii^(-alpha / (alpha + 1)), takes a median of 6 steps (at most
148 over the property suite's input classes, alpha from 0.05 to 50), then up to 3 full steps
polish the residual to its rounding floor. The result is checked on the original M:
|(M w)_i - w_i^(-1/alpha)| <= 1e-10 ((|M| w)_i + w_i^(-1/alpha)) for every task.

Where no solution exists (documented fallback). F has a minimizer exactly when no non-negative
non-zero combination of the gradients vanishes, i.e. J is not weakly stationary (0 is not in the
convex hull of the g_i); a singular M alone (more tasks than the rank of J) is no obstacle.

- A zero gradient g_i makes the i-th equation unsolvable but decouples from the others (row and
  column i of M are zero): it gets w_i = 0 and the rest is solved without it.
- Otherwise, at a weakly stationary J (decided by the min-norm point of the hull, as for MGDA,
  docs/methods.md#min-norm; diagnostics["feasible"] False), or if Newton fails to reach the
  residual check (a safeguard: not seen on the property suite's input classes at any scale),
  the weights are zero (D = 0) and diagnostics["solved"] is False; off strong stationarity
  that zero is reported (docs/methods.md#stationarity).

Deviations: TorchJD (and the authors' code) call scipy's least_squares with bounds from
w = 1/T and stop at its default tolerances (relative residuals up to 1e-9 measured); here the
solve is exact to rounding (at most 5e-16 measured). The authors' training loop also clips the
update norm to 1 (max_norm): left to the optimizer here, as for every method. The update is not
homogeneous: D(sJ) = s^((1 - alpha) / (1 + alpha)) D(J) (scale free at alpha = 1).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve

from ..linalg import cosine_matrix, negligible_update, task_norms
from ..solvers import min_norm_point
from ._zero_update import note_zero_update
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register

# Relative residual of Eq. 4 at which Newton stops, and the one the result must pass on M.
_NEWTON_TOL = 1e-13
_CHECK_TOL = 1e-10
_MAX_ITERATIONS = 500
_ARMIJO = 1e-4
_MAX_HALVINGS = 60
_POLISH_STEPS = 3
# At most a factor e^5 per Newton step on any weight.
_MAX_LOG_STEP = 5.0


def relative_residual(M: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """|(M w)_i - w_i^(-1/alpha)| relative to the size of the terms, per task (w > 0)."""
    target = w ** (-1.0 / alpha)
    return np.abs(M @ w - target) / (np.abs(M) @ w + target)


def _objective(K: np.ndarray, b: np.ndarray, beta: np.ndarray, alpha: float) -> float:
    """F in the cosine form: 1/2 beta^T K beta - sum_i b_i psi(beta_i)."""
    p = 1.0 - 1.0 / alpha
    logs = np.log(beta)
    psi = logs if p == 0.0 else np.expm1(p * logs) / p  # (x^p - 1) / p: accurate near p = 0
    return 0.5 * float(beta @ K @ beta) - float(b @ psi)


def _newton(K: np.ndarray, b: np.ndarray, alpha: float) -> tuple[np.ndarray, int, bool]:
    """Damped Newton for (K beta)_i = b_i beta_i^(-1/alpha), beta > 0 (K: cosine matrix).

    The step is Newton's on F, taken along beta exp(t step / beta) (a step in log beta, which
    keeps beta > 0 and moves weights over orders of magnitude in few steps), with t at most 1
    and at most e^5 on any weight, halved until F decreases (Armijo) or, where F's changes
    fall below its rounding, the residual does.
    """
    beta = b ** (alpha / (alpha + 1.0))  # the solution for orthogonal gradients
    value = _objective(K, b, beta, alpha)
    for iteration in range(_MAX_ITERATIONS):
        target = b * beta ** (-1.0 / alpha)
        gradient = K @ beta - target
        residual = float(np.max(np.abs(gradient) / (np.abs(K) @ beta + target)))
        if residual <= _NEWTON_TOL:
            return _polish(K, b, beta, alpha, residual), iteration, True
        try:
            step = -cho_solve(cho_factor(K + np.diag(target / (alpha * beta)), lower=True),
                              gradient)
        except (LinAlgError, ValueError):
            return beta, iteration, False
        slope = float(gradient @ step)
        ratio = step / beta
        # For alpha > 1 F stays bounded as a weight goes to 0, so the search alone would let
        # a far-off step drive one into underflow: no weight moves by more than e^5 per step.
        t = min(1.0, _MAX_LOG_STEP / float(np.max(np.abs(ratio))))
        for _ in range(_MAX_HALVINGS):
            candidate = beta * np.exp(t * ratio)
            if np.isfinite(candidate).all() and (candidate > 0.0).all():
                new_value = _objective(K, b, candidate, alpha)
                new_target = b * candidate ** (-1.0 / alpha)
                new_residual = float(np.max(np.abs(K @ candidate - new_target)
                                            / (np.abs(K) @ candidate + new_target)))
                if new_value <= value + _ARMIJO * t * slope or new_residual < residual:
                    break
            t *= 0.5
        else:
            return beta, iteration, False
        beta, value = candidate, new_value
    return beta, _MAX_ITERATIONS, False


def _residual(K: np.ndarray, b: np.ndarray, beta: np.ndarray, alpha: float) -> float:
    target = b * beta ** (-1.0 / alpha)
    return float(np.max(np.abs(K @ beta - target) / (np.abs(K) @ beta + target)))


def _polish(K: np.ndarray, b: np.ndarray, beta: np.ndarray, alpha: float,
            residual: float) -> np.ndarray:
    """Full Newton steps from a converged beta while they still reduce the residual: down to
    the rounding floor of evaluating Eq. 4 (a few eps), where the stopping test left ~1e-13."""
    for _ in range(_POLISH_STEPS):
        target = b * beta ** (-1.0 / alpha)
        try:
            step = cho_solve(cho_factor(K + np.diag(target / (alpha * beta)), lower=True),
                             K @ beta - target)
        except (LinAlgError, ValueError):
            break
        candidate = beta * np.exp(-step / beta)
        new_residual = _residual(K, b, candidate, alpha)
        if not new_residual < residual:
            break
        beta, residual = candidate, new_residual
    return beta


def fairgrad_weights(M: np.ndarray, alpha: float) -> tuple[np.ndarray, Diagnostics]:
    """FairGrad weights w (D = J^T w) solving Eq. 4 on the tasks with non-zero gradients."""
    T = M.shape[0]
    w = np.zeros(T)
    live = np.flatnonzero(task_norms(M) > 0)
    diagnostics: Diagnostics = {"solved": False, "feasible": True, "residual": math.nan,
                                "iterations": 0}
    if live.size == 0:
        diagnostics["solved"] = True  # nothing to solve: D = 0 is the only update
        return w, diagnostics
    M_live = M[np.ix_(live, live)]
    if negligible_update(M_live, min_norm_point(M_live)):
        diagnostics["feasible"] = False  # weakly stationary: Eq. 4 has no solution
        return w, diagnostics
    # Cosine form: beta = N w with N = diag(n), n_i = ||g_i|| / max_j ||g_j||, solves
    # (K beta)_i = n_i^(1/alpha - 1) beta_i^(-1/alpha) for M / max_j M_jj; M itself maps back by
    # w = s^(-alpha / (alpha + 1)) w~ for M = s M~.
    norms = task_norms(M_live)
    largest = float(norms.max())
    relative = norms / largest
    with np.errstate(over="ignore"):
        barrier = relative ** (1.0 / alpha - 1.0)
    if not np.isfinite(barrier).all():  # a tiny alpha with norms far apart: out of range
        return w, diagnostics
    beta, iterations, _ = _newton(cosine_matrix(M_live, norms), barrier, alpha)
    diagnostics["iterations"] = iterations
    with np.errstate(over="ignore", under="ignore"):
        candidate = beta / relative * math.exp(-2.0 * alpha / (alpha + 1.0) * math.log(largest))
    if not np.isfinite(candidate).all() or (candidate <= 0.0).any():
        return w, diagnostics
    residual = float(np.max(relative_residual(M_live, candidate, alpha)))
    diagnostics["residual"] = residual
    if residual <= _CHECK_TOL:
        w[live] = candidate
        diagnostics["solved"] = True
    return w, diagnostics


@register
class FairGrad(GramianWeighting):
    """FairGrad (Ban & Ji, ICML 2024, Eq. 4): w > 0 with (M w)_i = w_i^(-1/alpha); see the
    module docstring.

    Option ``alpha`` (> 0): the fairness exponent; default 1.0, the authors' code's default
    (their experiments also use 2.0; TorchJD has no default). Diagnostics: ``solved`` (Eq. 4
    solved to the residual check), ``feasible`` (False: J is weakly stationary, Eq. 4 has no
    solution), ``residual`` (the largest relative residual of Eq. 4 on M), ``iterations``
    (Newton steps) and ``zero_update`` (None, "stationary", "infeasible" or "unsolved").

    >>> import torch, deconflict
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> [round(x, 12) for x in FairGrad(alpha=1.0).weights(J @ J.T).tolist()]
    [0.5, 1.0]
    """

    name = "fairgrad"
    summary = "Alpha-fair update: weights solving (M w)_i = w_i^(-1/alpha)"
    paper = "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024"
    family = "multi-objective"

    OPTIONS = (
        Option("alpha", "float", 1.0, "fairness exponent: 1 is proportional fairness, larger "
               "values approach max-min fairness", low=0.0, low_open=True),
    )

    alpha: float

    def __init__(self, alpha: float = 1.0) -> None:
        self._set_options(alpha=alpha)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        w, diagnostics = fairgrad_weights(M, self.alpha)
        if diagnostics["feasible"]:
            note_zero_update(self, M, w, diagnostics, "unsolved",
                             "Newton's method did not solve (M w)_i = w_i^(-1/alpha) to the "
                             "residual check (weights spanning too many orders of magnitude)")
        else:
            note_zero_update(self, M, w, diagnostics, "infeasible",
                             "the equations (M w)_i = w_i^(-1/alpha) have no positive solution "
                             "(0 is in the convex hull of the task gradients), so no update "
                             "improves every task")
        return w, diagnostics
