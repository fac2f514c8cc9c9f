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

from ..linalg import cosine_matrix, pivoted_cholesky_solve, task_norms
from ._zero_update import note_zero_update
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register

# Pivoted-Cholesky cutoff (sin^2 of an unpicked gradient's angle to the picked ones).
_RCOND = 1e-13
# Residual of K x = 1 above which no equal-projection direction exists.
_RESIDUAL_TOL = 1e-8


def imtl_g_weights(M: np.ndarray, sign_guard: str) -> tuple[np.ndarray, Diagnostics]:
    """IMTL-G weights alpha (D = J^T alpha) with the chosen sign guard."""
    T = M.shape[0]
    norms = task_norms(M)
    live = np.flatnonzero(norms > 0)
    alpha = np.zeros(T)
    diagnostics: Diagnostics = {"feasible": True, "sign_flipped": False, "fallback_to_mean": False}
    if live.size == 0:
        return alpha, diagnostics
    K = cosine_matrix(M, norms)[np.ix_(live, live)]
    ones = np.ones(live.size)
    # Minimum norm: with exactly dependent gradients the normalization 1^T alpha = 1 depends on
    # the solution chosen; the minimum-norm one treats duplicated tasks symmetrically.
    x, _ = pivoted_cholesky_solve(K, ones, _RCOND, minimum_norm=True)
    if np.max(np.abs(K @ x - ones)) > _RESIDUAL_TOL * max(1.0, float(np.abs(x).max())):
        diagnostics["feasible"] = False
        return alpha, diagnostics
    a = np.zeros(T)
    a[live] = x / norms[live]
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
