"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021; METHODS.md Section 6).

Primal (paper Eq. 3): maximize over D the worst task improvement min_i g_i . D, subject to
||D - g0|| <= c ||g0||, with g0 the mean gradient. Dual (paper Algorithm 1): w* minimizes
F(w) = g_w . g0 + c ||g0|| ||g_w|| over the simplex, and D = g0 + (c ||g0|| / ||g_w*||) g_w*.
In weights: c_vec = 1/T + (c ||g0|| / ||g_w*||) w*. The dual is solved to machine precision
(``solvers.conflict_averse_weights``; no cvxpy, no SLSQP), so the dual optimum F(w*) equals the
primal value min_i g_i . D.

Options: ``c`` >= 0 (paper: c in [0, 1) for its convergence guarantee; 0 gives the mean
gradient) and ``rescale`` (0: D; 1: D / (1 + c^2), the official default; 2: D / (1 + c)).
The official image-to-image code, nash-mtl and Recon also multiply by T; multiply the learning
rate instead if you need that scale.

Degenerate case: when the optimal g_w* is (within 1e-6 of the largest gradient norm) zero, the
hull of the gradients (nearly) contains 0 and the direction g_w / ||g_w|| is undefined; D = g0
is returned, like the official code's eps guard (TorchJD returns 0 instead), and the
diagnostic ``stationary`` is True.
"""

from __future__ import annotations

import numpy as np

from ..solvers import conflict_averse_weights
from .base import Context, Diagnostics, Method, bounded_option, choice_option
from .registry import register


def cagrad_weights(
    M: np.ndarray, anchor: np.ndarray, c: float, rescale: int
) -> tuple[np.ndarray, Diagnostics]:
    """Weights over the rows of a Gramian for the ball around g_a = J^T anchor (CAGrad: 1/T)."""
    w, gw_norm, anchor_norm = conflict_averse_weights(M, anchor, c)
    stationary = gw_norm == 0.0
    weights = anchor.copy() if stationary else anchor + (c * anchor_norm / gw_norm) * w
    weights = weights / (1.0, 1.0 + c * c, 1.0 + c)[rescale]
    return weights, {"dual_weights": w, "stationary": bool(stationary)}


@register
class CAGrad(Method):
    """CAGrad (Liu et al., NeurIPS 2021, Eq. 3 and its dual); see the module docstring.

    Diagnostics: ``dual_weights`` (w*), ``stationary`` (the degenerate case above).
    """

    name = "cagrad"
    summary = "Best worst-task improvement within a ball around the mean gradient (exact dual)"
    paper = "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021"
    family = "multi-objective"

    def __init__(self, c: float = 0.5, rescale: int = 1) -> None:
        self.c = bounded_option(self.name, "c", c, 0.0)
        self.rescale = choice_option(self.name, "rescale", rescale, (0, 1, 2))

    def options(self) -> dict[str, object]:
        return {"c": self.c, "rescale": self.rescale}

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        assert M is not None
        T = M.shape[0]
        return cagrad_weights(M, np.full(T, 1.0 / T), self.c, self.rescale)
