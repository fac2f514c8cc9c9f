"""GradOPS: orthogonal projections onto subspaces (Zhu et al., WSDM 2025;
``docs/methods.md#gradops``).

Paper (Section 3, Algorithm 1, Eq. 1-5):

1. Every task i whose gradient conflicts with another (some g_i . g_j < 0) is replaced by
   g'_i = g_i - P_{-i} g_i, its component orthogonal to S_{-i} = span{g_j : j != i} (Eq. 1-2);
   other tasks keep g'_i = g_i. Then g'_i . g_j >= 0 for every i, j ("strong non-conflict").
2. G' = sum_i g'_i, R_i = G' . g_i / ||g_i|| (Eq. 3), r_i = R_i / mean(R) (Eq. 4),
   w_i = r_i^alpha / mean(r^alpha) (Eq. 5), and the update is D = sum_i w_i g'_i.

Gramian form. g'_i = J^T c^(i): for a projected task c^(i)_i = 1 and c^(i)_{-i} = -M_{-i}^+ m_{-i},
and ||g'_i||^2 = s_i = M_ii - m_{-i}^T M_{-i}^+ m_{-i} (a generalized Schur complement). The
projections are computed on the cosine matrix K = N^-1 M N^-1 (unit gradients), which keeps them
accurate when gradient norms differ by orders of magnitude, and mapped back with
c^(i)_j = n_i k^(i)_j / n_j. Since g'_k is orthogonal to g_i for every projected k != i,
R_i = (s_i if i is projected) / n_i + sum over unprojected k of M_ik / n_i.

Cases (the numerically stable procedure of ``docs/methods.md#gradops``):

- Full-rank fast path: if K is well conditioned, one Cholesky factorization gives every
  projection, k^(i) = K^-1 e_i / (K^-1)_ii and s_i = 1 / (K^-1)_ii.
- Otherwise each projected task solves its own Schur complement K_{-i} x = k_{-i} with a
  pivoted Cholesky factorization (Gram-Schmidt with pivoting on the Gramian: exactly dependent
  other tasks get zero coefficients). It is backward stable, which an eigendecomposition-based
  pseudo-inverse is not: that one's residual, ~eps / lambda_min, broke the guarantee at 1e-9
  for cosines of 1 - 1e-9 between other tasks.
  A task whose gradient lies in (or within sqrt(dependence_tol) radians of) the span of the
  others is *dependent*: g'_i = 0. Dependence is decided per task on sin^2 of the angle to the
  span, never by thresholding R.
- Zero gradients never conflict and, like dependent tasks, are left out of the active set A over
  which r and w are normalized; they get w_i = 0. For i in A, R_i > 0, so r^alpha is finite for
  every alpha.
- Post-check: each projected g'_i must satisfy g'_i . g_j >= -1e-9 ||g'_i|| ||g_j|| in exact
  arithmetic on M and keep its coefficients small enough (sum_j |k_j| / ||u'_i|| <= ~4.5e7) that
  forming J^T c in float64 moves its direction by at most 1e-8. A task that fails is
  recomputed with larger cutoffs and, failing that, treated as dependent; dropping a projected
  task never creates a conflict, because every remaining term w_k g'_k . g_j is non-negative.

Guarantee (exact in M, checked in floating point): (J D)_j = (M c)_j >= 0 for every task j.
Special cases: T = 1 gives D = g_1; alpha = 0 gives D = sum_i g'_i, which equals PCGrad at T = 2;
alpha = -1 with every task conflicting and M full rank gives the IMTL-G direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.linalg import lapack

from ..linalg import cosine_matrix, pivoted_cholesky_solve, task_norms
from ._zero_update import note_zero_update
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register

# Pivoted-Cholesky cutoff on K_{-i} (sin^2 of a vector's angle to the span of those picked):
# only vectors dependent up to rounding are left out; near-dependence of the projected task
# itself is decided by dependence_tol.
_RCOND = 1e-13
# Post-check: the exact-in-M residual conflict allowed, cos(g'_i, g_j) >= -_CHECK_TOL, and the
# direction error allowed from forming J^T c in float64, about eps * sum|c| |g| / |g'_i|.
_CHECK_TOL = 1e-9
_ROUNDING_BUDGET = 1e-8
_EPS = float(np.finfo(np.float64).eps)
# The one-factorization fast path needs lambda_min(K) above this as well as above
# dependence_tol: below it, the per-task pivoted solves are the accurate choice.
_FAST_PATH_MIN_EIGENVALUE = 1e-8
# Each retry multiplies both cutoffs by this factor.
_ESCALATION = 1e3
_RETRIES = 3


@dataclass(frozen=True)
class Projections:
    """Projected unit gradients u'_i = U^T coefficients[i] (rows), on the unit-gradient basis."""

    coefficients: np.ndarray  # T x T
    sin2: np.ndarray  # ||u'_i||^2: 1 for unprojected tasks, 0 for dependent or zero ones
    projected: np.ndarray  # bool: g'_i was projected and is nonzero
    dependent: np.ndarray  # bool: conflicting, but g_i lies in the span of the others
    retried: np.ndarray  # bool: the post-check forced larger cutoffs for this task


def project_conflicting(
    K: np.ndarray, to_project: np.ndarray, dependence_tol: float
) -> Projections:
    """Project the unit gradients flagged in ``to_project`` off the span of all the others.

    ``K`` is the cosine matrix with zero rows for zero gradients (those never need projecting).
    """
    T = K.shape[0]
    nonzero = np.diag(K) > 0
    coefficients = np.eye(T)
    coefficients[~nonzero] = 0.0
    sin2 = nonzero.astype(float)
    dependent = np.zeros(T, dtype=bool)
    retried = np.zeros(T, dtype=bool)
    targets = np.flatnonzero(to_project & nonzero)
    if targets.size == 0:
        return Projections(coefficients, sin2, dependent.copy(), dependent, retried)

    live = np.flatnonzero(nonzero)
    K_live = K if live.size == T else K[np.ix_(live, live)]
    if np.linalg.eigvalsh(K_live)[0] > max(dependence_tol, _FAST_PATH_MIN_EIGENVALUE):
        # Fast path: by interlacing, every K_{-i} is well conditioned and every
        # s_i >= lambda_min(K) > dependence_tol, so the per-task form finds the same projections.
        # Cholesky (not an eigendecomposition) keeps the residual of K^-1 at rounding level.
        factor = np.linalg.cholesky(K_live)
        position = np.searchsorted(live, targets)
        unit = np.zeros((live.size, targets.size))
        unit[position, np.arange(targets.size)] = 1.0
        columns, _ = lapack.dpotrs(factor, unit, lower=1)
        rows = columns.T
        diagonal = rows[np.arange(targets.size), position]
        scaled_rows = rows / diagonal[:, None]
        if live.size == T:
            coefficients[targets] = scaled_rows
        else:
            coefficients[targets] = 0.0
            coefficients[np.ix_(targets, live)] = scaled_rows
        sin2[targets] = 1.0 / diagonal
    else:
        for i in targets:
            _project_one(K, live, int(i), dependence_tol, _RCOND, coefficients, sin2, dependent)

    failing = targets[~dependent[targets] & ~_passes_check(K, coefficients[targets], sin2[targets])]
    for i in failing:
        retried[i] = True
        tol, rcond = dependence_tol, _RCOND
        for _ in range(_RETRIES):
            tol, rcond = tol * _ESCALATION, rcond * _ESCALATION
            _project_one(K, live, int(i), tol, rcond, coefficients, sin2, dependent)
            if dependent[i] or _passes_check(K, coefficients[i:i + 1], sin2[i:i + 1])[0]:
                break
        else:
            _mark_dependent(int(i), coefficients, sin2, dependent)
    projected = np.zeros(T, dtype=bool)
    projected[targets] = ~dependent[targets]
    return Projections(coefficients, sin2, projected, dependent, retried)


def _project_one(
    K: np.ndarray, live: np.ndarray, i: int, tol: float, rcond: float,
    coefficients: np.ndarray, sin2: np.ndarray, dependent: np.ndarray,
) -> None:
    """Schur form for one task: K_{-i} x = k_{-i} (pivoted Cholesky), sin^2 = 1 - k_{-i} . x."""
    others = live[live != i]
    coefficients[i] = 0.0
    coefficients[i, i] = 1.0
    dependent[i] = False
    if others.size == 0:
        sin2[i] = 1.0
        return
    k = K[others, i]
    x, _ = pivoted_cholesky_solve(K[np.ix_(others, others)], k, rcond)
    s = 1.0 - float(k @ x)
    # 1 - k.x cancels: its rounding error grows with the size of x.
    if s <= max(tol, 64.0 * _EPS * (1.0 + float(np.abs(x).sum()))):
        _mark_dependent(i, coefficients, sin2, dependent)
        return
    coefficients[i, others] = -x
    sin2[i] = s


def _mark_dependent(i: int, coefficients: np.ndarray, sin2: np.ndarray, dependent: np.ndarray):
    coefficients[i] = 0.0
    sin2[i] = 0.0
    dependent[i] = True


def _passes_check(K: np.ndarray, rows: np.ndarray, sin2: np.ndarray) -> np.ndarray:
    """Per row: u'_i . u_j >= -tol ||u'_i|| for all j, with float64 rounding of J^T c within it."""
    length = np.sqrt(np.maximum(sin2, 0.0))
    small_coefficients = _EPS * np.abs(rows).sum(axis=1) <= _ROUNDING_BUDGET * length
    no_conflict = (rows @ K).min(axis=1) >= -_CHECK_TOL * length
    return (length > 0.0) & small_coefficients & no_conflict


def gradops_weights(
    M: np.ndarray, alpha: float, gating: str = "per_task", dependence_tol: float = 1e-6
) -> tuple[np.ndarray, Diagnostics]:
    """The GradOPS task weights c (D = J^T c) and diagnostics, from a float64 Gramian."""
    T = M.shape[0]
    norms = task_norms(M)
    nonzero = norms > 0
    K = cosine_matrix(M, norms)
    negative = M < 0
    np.fill_diagonal(negative, False)
    conflicting = np.asarray(negative.any(axis=1))
    if gating == "all":  # every nonzero task, as soon as any pair conflicts
        to_project = nonzero if conflicting.any() else np.zeros_like(nonzero)
    else:
        to_project = conflicting
    proj = project_conflicting(K, to_project, dependence_tol)

    unprojected = nonzero & ~to_project
    active = proj.projected | unprojected
    # R_i = n_i sin2_i [i projected] + sum over unprojected k of n_k K_ik  (= G'.g_i / n_i)
    R = np.where(proj.projected, norms * proj.sin2, 0.0) + K[:, unprojected] @ norms[unprojected]
    w = np.zeros(T)
    r = np.zeros(T)
    if active.any():
        R_active = R[active]
        size = R_active.size
        r[active] = R_active * (size / R_active.sum())
        if alpha == 0.0:
            w[active] = 1.0
        else:
            exponent = alpha * np.log(r[active])
            scaled = np.exp(exponent - exponent.max())
            w[active] = scaled * (size / scaled.sum())

    # Back from unit gradients to raw ones: c^(i)_j = n_i k^(i)_j / n_j.
    safe = np.where(nonzero, norms, 1.0)
    C = proj.coefficients * norms[:, None] / safe[None, :]
    if unprojected.any():
        C[unprojected] = np.eye(T)[unprojected]
    c = C.T @ w
    diagnostics: Diagnostics = {
        "conflicting": conflicting,
        "projected": proj.projected,
        "dependent": proj.dependent,
        "active": active,
        "R": R,
        "r": r,
        "w": w,
        "projected_sq_norms": proj.sin2 * norms**2,
        "projection_coefficients": C,
        "retried": proj.retried,
    }
    return c, diagnostics


@register
class GradOPS(GramianWeighting):
    """GradOPS (Zhu et al., WSDM 2025, Algorithm 1, Eq. 1-5); see the module docstring.

    Options:

    - ``alpha``: the trade-off exponent of Eq. 5 (any finite real). 0 sums the projected
      gradients; alpha < 0 favours tasks the update serves least (alpha = -1 is IMTL-G-like,
      very negative values approach MGDA); alpha > 0 favours the dominating tasks.
    - ``gating``: "per_task" (Algorithm 1, line 4: project only tasks that conflict with some
      other task) or "all" (project every task as soon as any pair conflicts). Both keep the
      non-conflict guarantee.
    - ``dependence_tol``: a task is dependent when sin^2 of the angle between its gradient and
      the span of the others is at most this (default 1e-6, i.e. within ~0.06 degrees).

    Diagnostics: ``conflicting``, ``projected``, ``dependent``, ``active`` (bool per task),
    ``R``, ``r``, ``w`` (Eq. 3-5), ``projected_sq_norms`` (||g'_i||^2),
    ``projection_coefficients`` (row i: g'_i = J^T row), ``retried`` (post-check fired),
    ``zero_update``: None, or why the update is zero: "stationary" (J is strongly
    Pareto-stationary), "dependent" (every conflicting task is dependent: with more tasks than
    the rank of J, Eq. 1-2 leave nothing) or "cancelled"; the last two also issue a
    ``ZeroUpdateWarning`` once per instance.

    At T = 2 with alpha = 0 the update is PCGrad's, and it conflicts with no task:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> D = deconflict.aggregate(J, deconflict.GradOPS(alpha=0.0))
    >>> D
    tensor([0.8000, 1.4000])
    >>> J @ D
    tensor([0.8000, 1.0000])
    """

    name = "gradops"
    summary = "Project conflicting gradients off the span of the others, reweight by r_i^alpha"
    paper = ("Zhu et al., Gradient Deconfliction via Orthogonal Projections onto Subspaces for "
             "Multi-task Learning, WSDM 2025")
    family = "projection"

    OPTIONS = (
        Option("alpha", "float", 0.0, "trade-off exponent of the weights (r_i)^alpha: negative "
               "favours conflicting tasks, 0 is the projected sum"),
        Option("gating", "str", "per_task", "project only the tasks that conflict with another "
               "(Algorithm 1) or all of them once any pair conflicts",
               choices=("per_task", "all")),
        Option("dependence_tol", "float", 1e-6, "a gradient within sqrt(dependence_tol) radians "
               "of the others' span counts as dependent", low=0.0, high=1.0, high_open=True),
    )

    alpha: float
    gating: str
    dependence_tol: float

    def __init__(
        self,
        alpha: float = 0.0,
        gating: Literal["per_task", "all"] = "per_task",
        dependence_tol: float = 1e-6,
    ) -> None:
        self._set_options(alpha=alpha, gating=gating, dependence_tol=dependence_tol)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        c, diagnostics = gradops_weights(M, self.alpha, self.gating, self.dependence_tol)
        note_projected_zero_update(self, M, c, diagnostics)
        return c, diagnostics


def note_projected_zero_update(
    method: GramianWeighting, M: np.ndarray, c: np.ndarray, diagnostics: Diagnostics
) -> None:
    """Say why a sum of GradOPS's projected gradients is zero, if it is (``_zero_update``)."""
    if diagnostics["active"].any():
        note_zero_update(method, M, c, diagnostics, "cancelled",
                         "the weighted projected gradients cancel")
    else:
        note_zero_update(method, M, c, diagnostics, "dependent",
                         "every conflicting task gradient lies in the span of the others "
                         "(as when there are more tasks than the rank of J), so each "
                         "projection g'_i is zero and nothing is left to sum")
