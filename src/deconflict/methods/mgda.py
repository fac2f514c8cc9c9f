"""MGDA: the min-norm point of the convex hull of the gradients (Sener & Koltun, NeurIPS 2018;
Désidéri 2012; METHODS.md Section 5).

With normalizers nu_i and Mt = N^-1 M N^-1 (the Gramian of g_i / nu_i), solve
alpha* = argmin over the simplex of alpha^T Mt alpha, exactly, with Wolfe's active-set
algorithm (``solvers.min_norm_point``). Optimality: (Mt alpha*)_i >= alpha*^T Mt alpha* for all
i, with equality where alpha*_i > 0.

Normalizers (official code; "not included in the paper"): "none" (nu = 1), "l2" (nu = ||g_i||),
"loss" (nu = L_i), "loss+" (nu = L_i ||g_i||). A zero gradient keeps nu = 1 under "l2"/"loss+":
it is the zero point of the hull, so MGDA returns D = 0 (the point is Pareto-stationary).

Which gradients the weights apply to (``update_from``):

- "normalized" (default, LibMTL): D = sum_i alpha*_i g_i / nu_i, the min-norm point itself.
  Then g_j . D >= ||D||^2 nu_j >= 0: never conflicting.
- "raw" (official code, nash-mtl): D = sum_i alpha*_i g_i. Differs when nu is not constant and
  can then conflict.

With the default normalizer "none" both coincide.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import InvalidOptionError
from ..linalg import task_norms
from ..solvers import min_norm_point
from .base import Context, Diagnostics, Method, choice_option
from .registry import register

NORMALIZERS = ("none", "l2", "loss", "loss+")


def gradient_normalizers(M: np.ndarray, losses: np.ndarray | None, kind: str) -> np.ndarray:
    """nu_i for the normalizer ``kind``; zero gradients keep nu_i = 1."""
    T = M.shape[0]
    if kind == "none":
        return np.ones(T)
    norms = task_norms(M)
    nu = np.ones(T)
    if kind in ("loss", "loss+"):
        assert losses is not None
        if np.any(losses <= 0):
            bad = [int(i) for i in np.flatnonzero(losses <= 0)]
            raise InvalidOptionError(
                f"MGDA's {kind!r} normalizer divides by the loss, but the losses of tasks {bad} "
                "are not positive"
            )
        nu = nu * losses
    if kind in ("l2", "loss+"):
        nu = nu * np.where(norms > 0, norms, 1.0)
    return nu


@register
class MGDA(Method):
    """MGDA with the exact min-norm solver; see the module docstring.

    Options: ``normalizer`` in {"none", "l2", "loss", "loss+"} (default "none"),
    ``update_from`` in {"normalized", "raw"} (default "normalized").

    Diagnostics: ``alpha`` (the simplex weights), ``normalizers`` (nu), ``min_norm_sq``
    (alpha^T Mt alpha).
    """

    name = "mgda"
    summary = "Min-norm point of the convex hull of the task gradients (exact active-set solver)"
    paper = "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018"
    family = "multi-objective"

    def __init__(
        self,
        normalizer: Literal["none", "l2", "loss", "loss+"] = "none",
        update_from: Literal["normalized", "raw"] = "normalized",
    ) -> None:
        self.normalizer = choice_option(self.name, "normalizer", normalizer, NORMALIZERS)
        self.update_from = choice_option(self.name, "update_from", update_from,
                                         ("normalized", "raw"))

    @property
    def needs_losses(self) -> bool:
        return self.normalizer in ("loss", "loss+")

    def options(self) -> dict[str, object]:
        return {"normalizer": self.normalizer, "update_from": self.update_from}

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        assert M is not None
        nu = gradient_normalizers(M, context.losses, self.normalizer)
        Mt = M / np.outer(nu, nu)
        alpha = min_norm_point(Mt)
        c = alpha / nu if self.update_from == "normalized" else alpha
        return c, {"alpha": alpha, "normalizers": nu, "min_norm_sq": float(alpha @ Mt @ alpha)}
