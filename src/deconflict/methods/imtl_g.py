"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021;
``docs/methods.md#imtl_g``).

Find D = J^T alpha with 1^T alpha = 1 whose projections onto the unit gradients u_i = g_i / n_i
are all equal. Closed form: a = M^+ n, alpha = a / (1^T a). Computed here on the cosine matrix
K (better conditioned, scale free): x solves K x = 1 when possible (pivoted Cholesky, so exactly
dependent gradients are handled like Gram-Schmidt would), and a_i = x_i / n_i,
since M N^-1 x = N K x = n. Zero gradients are left out (alpha_i = 0).

Two documented deviations from every reference implementation:

- Sign guard. J D = M a / (1^T a) = n / (1^T a): when 1^T a < 0 (it happens in ~4% of random
  well-conditioned draws, even without any conflict), the reference update *increases* every
  loss to first order. ``sign_guard="flip"`` (default) uses alpha = a / |1^T a|, which keeps
  every projection positive; ``"mean"`` falls back to the mean gradient when 1^T a <= 0;
  ``"off"`` reproduces the reference behaviour. If |1^T a| is below 1e-12 sum|a| the sum cannot
  be normalized; "flip" then uses a / sum|a|.
- No equal-projection direction. If 1 is not in the range of K (e.g. two opposite gradients),
  every D with equal projections has them all zero; the method returns zero weights (D = 0)
  instead of a least-squares solution that would conflict. Diagnostic ``feasible`` is False.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..kernels import compiled, numba
from ..linalg import cosine_matrix, pivoted_cholesky_solve, task_norms
from ._zero_update import note_zero_update
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register

# Pivoted-Cholesky cutoff (sin^2 of an unpicked gradient's angle to the picked ones).
_RCOND = 1e-13
# Residual of K x = 1 above which no equal-projection direction exists.
_RESIDUAL_TOL = 1e-8


# Outcomes of the compiled solve (``_raw_weights_compiled``).
_SOLVED, _INFEASIBLE, _RANK_DEFICIENT = 0, 1, 2


def imtl_g_weights(M: np.ndarray, sign_guard: str) -> tuple[np.ndarray, Diagnostics]:
    """IMTL-G weights alpha (D = J^T alpha) with the chosen sign guard."""
    T = M.shape[0]
    norms = task_norms(M)
    live = np.flatnonzero(norms > 0)
    alpha = np.zeros(T)
    diagnostics: Diagnostics = {"feasible": True, "sign_flipped": False, "fallback_to_mean": False}
    if live.size == 0:
        return alpha, diagnostics
    outcome = _RANK_DEFICIENT
    if live.size == T and compiled():
        # Every gradient nonzero: the compiled solve, unless K is numerically singular.
        a, outcome = _raw_weights_compiled(np.ascontiguousarray(M, dtype=np.float64), norms,
                                           _RCOND, _RESIDUAL_TOL)
    if outcome == _RANK_DEFICIENT:
        a, outcome = _raw_weights(M, norms, live)
    if outcome == _INFEASIBLE:
        diagnostics["feasible"] = False
        return alpha, diagnostics
    total = float(a.sum())
    normalizable = abs(total) > 1e-12 * float(np.abs(a).sum())
    if total > 0.0 and normalizable:
        alpha = a / total
    elif sign_guard == "off":
        alpha = a / total if normalizable else alpha  # TorchJD: zero weights when 1^T a ~ 0
    elif sign_guard == "mean":
        alpha = np.full(T, 1.0 / T)
        diagnostics["fallback_to_mean"] = True
    else:
        alpha = a / (abs(total) if normalizable else float(np.abs(a).sum()))
        diagnostics["sign_flipped"] = total < 0.0
    diagnostics["sum_of_raw_weights"] = total
    return alpha, diagnostics


def _raw_weights(M: np.ndarray, norms: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, int]:
    """(a, outcome): a = N^-1 x with K x = 1 on the live tasks (zero elsewhere), or
    ``_INFEASIBLE`` when 1 is not in the range of K."""
    a = np.zeros(M.shape[0])
    K = cosine_matrix(M, norms)[np.ix_(live, live)]
    ones = np.ones(live.size)
    # Minimum norm: with exactly dependent gradients the normalization 1^T alpha = 1 depends on
    # the solution chosen; the minimum-norm one treats duplicated tasks symmetrically.
    x, _ = pivoted_cholesky_solve(K, ones, _RCOND, minimum_norm=True)
    if np.max(np.abs(K @ x - ones)) > _RESIDUAL_TOL * max(1.0, float(np.abs(x).max())):
        return a, _INFEASIBLE
    a[live] = x / norms[live]
    return a, _SOLVED


if numba is not None:

    @numba.njit(cache=True)
    def _raw_weights_compiled(M, norms, rcond, residual_tol):  # pragma: no cover - compiled
        # ``_raw_weights`` for nonzero norms, by the same pivoted Cholesky (LAPACK's dpstf2:
        # the largest remaining diagonal first, stop when it is <= rcond) in compiled loops.
        # A numerically singular K (rank < T) is left to the NumPy path and its minimum-norm
        # solution: outcome _RANK_DEFICIENT.
        T = norms.size
        K = np.empty((T, T))
        for i in range(T):
            for j in range(T):
                K[i, j] = min(max(M[i, j] / (norms[i] * norms[j]), -1.0), 1.0)
            K[i, i] = 1.0
        A = K.copy()
        order = np.arange(T)
        for j in range(T):
            pivot = j
            for i in range(j + 1, T):
                if A[i, i] > A[pivot, pivot]:
                    pivot = i
            if not A[pivot, pivot] > rcond:
                return np.zeros(T), 2
            if pivot != j:  # symmetric swap of rows and columns j and pivot
                for k in range(T):
                    A[j, k], A[pivot, k] = A[pivot, k], A[j, k]
                for k in range(T):
                    A[k, j], A[k, pivot] = A[k, pivot], A[k, j]
                order[j], order[pivot] = order[pivot], order[j]
            root = np.sqrt(A[j, j])
            A[j, j] = root
            for i in range(j + 1, T):
                A[i, j] /= root
            for i in range(j + 1, T):  # the trailing Schur complement, both triangles (so
                for k in range(j + 1, T):  # the next symmetric swap moves current entries)
                    A[i, k] -= A[i, j] * A[k, j]
        # L L^T y = 1 (the permuted right-hand side is all ones), then x[order] = y.
        y = np.empty(T)
        for i in range(T):
            total = 1.0
            for k in range(i):
                total -= A[i, k] * y[k]
            y[i] = total / A[i, i]
        for i in range(T - 1, -1, -1):
            total = y[i]
            for k in range(i + 1, T):
                total -= A[k, i] * y[k]
            y[i] = total / A[i, i]
        x = np.empty(T)
        for i in range(T):
            x[order[i]] = y[i]
        largest = 1.0
        worst = 0.0
        for i in range(T):
            largest = max(largest, abs(x[i]))
            total = 0.0
            for k in range(T):
                total += K[i, k] * x[k]
            worst = max(worst, abs(total - 1.0))
        if worst > residual_tol * largest:
            return np.zeros(T), 1
        return x / norms, 0


@register
class IMTLG(GramianWeighting):
    """IMTL-G (Liu et al., ICLR 2021), closed form with a sign guard; see the module docstring.

    Options: ``sign_guard`` in {"flip", "mean", "off"} (default "flip").
    Diagnostics: ``feasible``, ``sign_flipped``, ``fallback_to_mean``, ``sum_of_raw_weights``
    (1^T a), ``zero_update``: None, or why the update is zero: "stationary" (J is strongly
    Pareto-stationary), "infeasible" (no equal-projection direction; every weakly but not
    strongly stationary J is one, and so is almost every J with more tasks than its rank) or
    "cancelled"; the last two also issue a ``ZeroUpdateWarning`` once per instance.

    Equal projections of the update on both unit gradients:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.IMTLG())
    tensor([0.2918, 0.4721])
    """

    name = "imtl_g"
    summary = "Update with equal projections on every unit gradient (closed form, sign-guarded)"
    paper = "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021"
    family = "multi-objective"

    OPTIONS = (
        Option("sign_guard", "str", "flip", "what to do when the closed form gives a weight of "
               "the wrong sign", choices=("flip", "mean", "off")),
    )

    sign_guard: str

    def __init__(self, sign_guard: Literal["flip", "mean", "off"] = "flip") -> None:
        self._set_options(sign_guard=sign_guard)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        alpha, diagnostics = imtl_g_weights(M, self.sign_guard)
        if diagnostics["feasible"]:
            note_zero_update(self, M, alpha, diagnostics, "cancelled",
                             "the sum 1^T a of the raw weights is zero and sign_guard='off' "
                             "cannot normalize it")
        else:
            note_zero_update(self, M, alpha, diagnostics, "infeasible",
                             "no direction has equal projections on every unit gradient (1 is "
                             "not in the range of the cosine matrix, as when there are more "
                             "tasks than the rank of J)")
        return alpha, diagnostics
