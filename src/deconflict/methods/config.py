"""ConFIG: conflict-free inverse gradients (Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free
Training of Physics Informed Neural Networks", ICLR 2025; docs/methods.md#config).

Eq. 2 of the paper, with the unit gradients u_i = g_i / ||g_i|| as the rows of U and a
preference vector p (default all 1):

    x = U^+ p,   x_hat = x / ||x||,   D = (sum_i g_i . x_hat) x_hat.

When p is in the range of U U^T, U x = p: the direction has projection p_i on every unit
gradient (equal ones for p = 1), so it conflicts with none, and its length is the sum of the
projections of the gradients on it.

Gramian form (derivation). With N = diag(1 / ||g_i||) (0 for a zero gradient), U = N J and
K = U U^T = N M N, the cosine matrix. U^+ = U^T (U U^T)^+, so x = J^T a with

    a = N K^+ p,   ||x||^2 = a^T M a,   sum_i g_i . x = 1^T M a,

and D = (1^T M a / a^T M a) J^T a: the weights are c = (1^T M a / a^T M a) a. K^+ p is the
minimum-norm least-squares solution of K y = p, from the eigendecomposition of K with the
eigenvalues below 100 T eps times the largest treated as zero (``_PINV_RTOL``: eigh's rounding
leaves the zero eigenvalues of a singular K at a few T eps, and inverting one of them would add
a spurious component of size ~1 / sqrt(T eps)): in float64 the
Gramian resolves a singular value of U only down to ~sqrt(T eps) of the largest, where
``torch.linalg.pinv(U)`` (TorchJD) resolves it to ~T eps. Where U^+ p = 0 (e.g. two opposite
gradients, p in the null space of K) the update is zero, as in TorchJD; so it is where p's
component in the range of K is below 16 T eps |p|, or x below the rounding floor of J^T a
(docs/methods.md#gramian): such an x is noise that the normalization would blow up to full
length (TorchJD returns such noise, 1e-10 to 1e-8 long, at two opposite gradients and at
collinear gradients whose signs sum to zero).

Accuracy: the Gramian form solves on K, whose condition number is that of U squared, so for
near-duplicate gradients (cond(U) ~ 1e6) the direction agrees with TorchJD's SVD of U to ~1e-4
only (both have equal projections on the unit gradients to ~1e-8).

The update is positively homogeneous (c does not change when J is scaled) and, for a p
permuted with the tasks, independent of the task order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..linalg import cosine_matrix, negligible_update, task_norms
from ._zero_update import note_zero_update
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register
from .upgrad import preference_weights

# Eigenvalues of K below this times T and the largest are rounding: K^+ leaves them out.
_PINV_RTOL = 100.0 * float(np.finfo(np.float64).eps)
# p's component in the range of K below this times T |p| is the rounding of an orthogonal p.
_RANGE_RTOL = 16.0 * float(np.finfo(np.float64).eps)


def config_weights(M: np.ndarray, pref: np.ndarray) -> tuple[np.ndarray, Diagnostics]:
    """ConFIG weights c (D = J^T c) for the preference vector ``pref``, from the Gramian."""
    T = M.shape[0]
    norms = task_norms(M)
    live = norms > 0
    c = np.zeros(T)
    diagnostics: Diagnostics = {"direction_weights": np.zeros(T), "rank": 0}
    if not live.any():
        return c, diagnostics
    K = cosine_matrix(M, norms)
    eigenvalues, vectors = np.linalg.eigh(K)
    kept = eigenvalues > _PINV_RTOL * T * eigenvalues[-1]
    coordinates = vectors[:, kept].T @ pref  # p on the range of K, in its eigenbasis
    y = vectors[:, kept] @ (coordinates / eigenvalues[kept])
    a = np.where(live, y / np.where(live, norms, 1.0), 0.0)
    diagnostics.update(direction_weights=a, rank=int(kept.sum()))
    # Where p is orthogonal to the range of K up to rounding, or x = J^T a is below its own
    # rounding floor, x is noise that the normalization would blow up to full length.
    in_range = float(np.linalg.norm(coordinates)) > _RANGE_RTOL * T * float(np.linalg.norm(pref))
    if in_range and not negligible_update(M, a):
        c = (float(np.sum(M @ a)) / float(a @ M @ a)) * a
    return c, diagnostics


@register
class ConFIG(GramianWeighting):
    """ConFIG (ICLR 2025, Eq. 2), in Gramian form; see the module docstring.

    Option ``pref_vector``: the target projections p on the unit gradients (default all 1, as
    in the paper and TorchJD). Diagnostics: ``direction_weights`` (a: x = J^T a is the
    unnormalized direction U^+ p), ``rank`` (of K as resolved), ``zero_update``.

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> [round(x, 12) for x in deconflict.aggregate(J, ConFIG()).tolist()]
    [1.5, 1.5]
    """

    name = "config"
    summary = "Direction with equal projections on the unit gradients, scaled by their sum"
    paper = ("Liu, Chu & Thuerey, ConFIG: Towards Conflict-free Training of Physics Informed "
             "Neural Networks, ICLR 2025")
    family = "multi-objective"

    OPTIONS = (
        Option("pref_vector", "float", None, "target projections on the unit gradients, one "
               "per task (none: all 1)", low=0.0, nullable=True, shape="list"),
    )

    pref_vector: tuple[float, ...] | None

    def __init__(self, pref_vector: Sequence[float] | None = None) -> None:
        self._set_options(pref_vector=pref_vector)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        T = M.shape[0]
        pref = np.ones(T) if self.pref_vector is None else preference_weights(
            self.name, self.pref_vector, T)
        c, diagnostics = config_weights(M, pref)
        note_zero_update(self, M, c, diagnostics, "infeasible",
                         "U^+ p is zero to rounding: the preference vector is orthogonal to the "
                         "range of the cosine matrix")
        return c, diagnostics
