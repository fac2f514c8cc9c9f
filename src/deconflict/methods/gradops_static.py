"""GradOPS-static: GradOPS's deconflicted gradients with fixed weights (Zhu et al., WSDM 2025,
Appendix C.3; docs/methods.md#gradops_static).

The paper's grid-search baseline: the modified gradients g'_i of GradOPS (Eq. 1-2: a task that
conflicts with another is projected onto the orthogonal complement of the span of the others;
the rest keep g'_i = g_i) combined with static weights chosen in advance,

    G'_static = sum_i w_i g'_i,   w_i > 0 fixed   (Appendix C.3; the paper's grid keeps
                                                   sum_i w_i = T, as ``sweep --weights
                                                   simplex:K`` does),

instead of the data-dependent w_i = r_i^alpha / mean(r^alpha) of Eq. 3-5. The projections are
GradOPS's own (``gradops.gradops_weights``, which computes them on the cosine matrix with the
post-check of docs/methods.md#gradops): row i of its ``projection_coefficients`` C gives
g'_i = J^T C_i, so c = C^T w.

Relations (tested):

- w = 1 is GradOPS with alpha = 0, exactly: Eq. 5 gives w_i = r_i^0 / mean(r^0) = 1 on the
  active tasks, and every inactive task (zero or dependent gradient) has g'_i = 0, so both
  updates are sum_i g'_i.
- For any alpha, GradOPS is GradOPS-static with w set to that step's Eq. 5 weights.
- No modified gradient conflicts with any original one (g'_i . g_j >= 0, Eq. 1-2), and the
  weights are positive, so the update never conflicts: g_j . D = sum_i w_i g'_i . g_j >= 0.

The update is positively homogeneous (D(sJ) = s D(J)) and independent of the task order when the
weights are permuted with the tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..errors import ShapeError
from .base import Context, Diagnostics, GramianWeighting
from .gradops import gradops_weights, note_projected_zero_update
from .options import Option
from .registry import register


@register
class GradOPSStatic(GramianWeighting):
    """GradOPS-static (GradOPS paper, Appendix C.3): D = sum_i w_i g'_i with fixed weights w.

    Options:

    - ``weights``: the static weights w, one positive number per task (default: all 1, which
      is GradOPS with alpha = 0). Checked against the number of tasks at each call.
    - ``gating``, ``dependence_tol``: as for GradOPS (which tasks are projected, and when a
      projected task counts as dependent: g'_i = 0).

    Diagnostics: GradOPS's (``conflicting``, ``projected``, ``dependent``, ``active``,
    ``projected_sq_norms``, ``projection_coefficients``, ``retried``; its ``R``, ``r``, ``w``
    are those of alpha = 0), ``static_weights`` (w) and ``zero_update`` (None, "stationary",
    "dependent" or "cancelled", as for GradOPS).

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> deconflict.aggregate(J, GradOPSStatic(weights=[1.5, 0.5])).tolist()
    [0.75, 1.25]
    """

    name = "gradops_static"
    summary = "GradOPS's deconflicted gradients summed with fixed static weights"
    paper = ("Zhu et al., Gradient Deconfliction via Orthogonal Projections onto Subspaces for "
             "Multi-task Learning, WSDM 2025 (Appendix C.3)")
    family = "projection"

    OPTIONS = (
        Option("weights", "float", None, "fixed positive weights of the deconflicted gradients, "
               "one per task (none: all 1)", low=0.0, low_open=True, nullable=True,
               shape="list", attribute="static_weights"),
        Option("gating", "str", "per_task", "project only the tasks that conflict with another "
               "(Algorithm 1) or all of them once any pair conflicts",
               choices=("per_task", "all")),
        Option("dependence_tol", "float", 1e-6, "a gradient within sqrt(dependence_tol) radians "
               "of the others' span counts as dependent", low=0.0, high=1.0, high_open=True),
    )

    static_weights: tuple[float, ...] | None
    gating: str
    dependence_tol: float

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        gating: Literal["per_task", "all"] = "per_task",
        dependence_tol: float = 1e-6,
    ) -> None:
        self._set_options(weights=weights, gating=gating, dependence_tol=dependence_tol)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        T = M.shape[0]
        if self.static_weights is None:
            w = np.ones(T)
        elif len(self.static_weights) != T:
            raise ShapeError(f"{self.name}: {len(self.static_weights)} weights for {T} tasks")
        else:
            w = np.array(self.static_weights)
        _, diagnostics = gradops_weights(M, 0.0, self.gating, self.dependence_tol)
        c = diagnostics["projection_coefficients"].T @ w
        diagnostics["static_weights"] = w
        note_projected_zero_update(self, M, c, diagnostics)
        return c, diagnostics
