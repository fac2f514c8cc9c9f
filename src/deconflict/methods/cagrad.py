"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021, Eq. 3 and Algorithm 1;
``docs/methods.md#cagrad``, the dual in ``docs/methods.md#conflict-averse``).

Primal (paper Eq. 3): maximize over D the worst task improvement min_i g_i . D, subject to
||D - g0|| <= c ||g0||, with g0 the mean gradient. Dual (paper Algorithm 1): w* minimizes
F(w) = g_w . g0 + c ||g0|| ||g_w|| over the simplex, and D = g0 + (c ||g0|| / ||g_w*||) g_w*.
In weights: c_vec = 1/T + (c ||g0|| / ||g_w*||) w*. The dual is solved to machine precision
(``solvers.conflict_averse_solution``; no cvxpy, no SLSQP), so the dual optimum F(w*) equals the
primal value min_i g_i . D.

Options: ``c`` >= 0 (paper: c in [0, 1) for its convergence guarantee; 0 gives the mean
gradient) and ``rescale`` (0: D; 1: D / (1 + c^2), the official default; 2: D / (1 + c)).
The official image-to-image code, nash-mtl and Recon also multiply by T; multiply the learning
rate instead if you need that scale.

Degenerate case (documented deviation from the official code). When the optimal g_w* is zero
(to the resolution of M: ||g_w||^2 below 1e3 4 (T+2) eps (sum_i w_i ||g_i||)^2), the hull of the
gradients contains 0, the dual value is F(w*) = 0 and the direction g_w / ||g_w|| is undefined.
Every D in the ball with J D >= 0 then attains the primal optimum 0 of Eq. 3 (0 is an upper
bound: sum_i w*_i g_i . D = 0), and the closest such D to g0 is P(g0), the projection of g0 onto
the dual cone {x : J x >= 0} (``dual_cone_weights``). P(g0) lies in the ball whenever the optimum
is attained (by strong duality some feasible D has J D >= 0, and P(g0) is the closest to the
centre); for c >= 1 always, since 0 is in the cone and ||0 - g0|| <= c ||g0||. So with
``degenerate="definition"`` (default) D = P(g0): zero when a strictly positive combination of
the gradients vanishes (strongly Pareto-stationary: the cone is the null space of J), else a
direction that improves some tasks and harms none. Should rounding put P(g0) outside the ball
(c < 1, a nearly degenerate hull), D is the ball's point on the segment from g0 to P(g0).
``degenerate="official"`` keeps the authors' eps guard, D = g0 (which conflicts: for
G = [[2, 0.3], [-1, -0.15]] and c = 10 it gives G D = [1.02, -0.51] before rescaling). TorchJD
returns 0. The diagnostic ``stationary`` is True in this case.

Guarantee for c >= 1: D never conflicts with a task (D = 0 is feasible, so the optimum of Eq. 3
is >= 0). The update is checked against it (``solvers.conflicts``, a rounding-error bound);
should the dual solve miss it, D is replaced by P(g0), which is feasible and non-conflicting,
and the diagnostic ``fallback`` is True. The dual is solved exactly, its KKT conditions checked
on M, for task-norm spans beyond 1e12 (``benchmarks/norm_spans.py`` prints the largest span
each solver holds); the diagnostic ``converged`` says whether the check passed. If it did not,
w* is the best point found: for c < 1 the update is still in the ball, for c >= 1 the
conflict check above applies.
"""

from __future__ import annotations

import math

import numpy as np

from ..solvers import (
    conflict_averse_solution,
    conflicts,
    dual_cone_weights,
    stationary_support,
)
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register

DEGENERATE = ("definition", "official")


def _cone_point_in_ball(M: np.ndarray, anchor: np.ndarray, c: float) -> np.ndarray:
    """Weights of P(g_a), g_a's projection onto the dual cone, pulled into the ball if outside.

    When every task is in a vanishing positive combination (``stationary_support``), the cone
    is J's null space and P(g_a) = 0 exactly: zero weights, not a projection's rounding.
    """
    if stationary_support(M).all():
        return np.zeros_like(anchor)
    projection = dual_cone_weights(M, anchor[None, :])[0]
    step = projection - anchor
    distance = math.sqrt(max(float(step @ M @ step), 0.0))
    radius = c * math.sqrt(max(float(anchor @ M @ anchor), 0.0))
    if distance <= radius:
        return projection
    return anchor + (radius / distance) * step


def cagrad_weights(
    M: np.ndarray, anchor: np.ndarray, c: float, rescale: int, degenerate: str = "definition"
) -> tuple[np.ndarray, Diagnostics]:
    """Weights over the rows of a Gramian for the ball around g_a = J^T anchor (CAGrad: 1/T).

    See the module docstring for the degenerate case and the c >= 1 guarantee.
    """
    solution = conflict_averse_solution(M, anchor, c)
    w, gw_norm, anchor_norm = solution.weights, solution.gw_norm, solution.anchor_norm
    stationary = gw_norm == 0.0 and c > 0.0 and anchor_norm > 0.0
    if gw_norm > 0.0:
        weights = anchor + (c * anchor_norm / gw_norm) * w
    elif not stationary or degenerate == "official":  # c = 0 or g_a = 0: the ball is {g_a}
        weights = anchor.copy()
    else:
        weights = _cone_point_in_ball(M, anchor, c)
    fallback = False
    if c >= 1.0 and degenerate == "definition" and np.any(conflicts(M, weights)):
        weights, fallback = _cone_point_in_ball(M, anchor, c), True
    weights = weights / (1.0, 1.0 + c * c, 1.0 + c)[rescale]
    return weights, {"dual_weights": w, "stationary": bool(stationary), "fallback": fallback,
                     "converged": solution.verified}


@register
class CAGrad(GramianWeighting):
    """CAGrad (Liu et al., NeurIPS 2021, Eq. 3 and its dual); see the module docstring.

    Options: ``c``, ``rescale``, ``degenerate`` (see the module docstring).

    Diagnostics: ``dual_weights`` (w*), ``stationary`` (the degenerate case above),
    ``fallback`` (c >= 1 and the dual solve's update conflicted: replaced by P(g0)),
    ``converged`` (the dual passed its KKT test on M; if False, w* is the best point found:
    for c < 1 the update is still in the ball, for c >= 1 the conflict check applies).

    The best worst-task improvement in the ball of radius 0.5 ||g0|| around g0:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.CAGrad(c=0.5))
    tensor([0.3663, 0.5495])
    """

    name = "cagrad"
    summary = "Best worst-task improvement within a ball around the mean gradient (exact dual)"
    paper = "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021"
    family = "multi-objective"

    OPTIONS = (
        Option("c", "float", 0.5, "radius of the ball around the mean gradient, relative to "
               "its norm (Eq. 3)", low=0.0),
        Option("rescale", "int", 1, "0: the update D; 1: D / (1 + c^2), the official default; "
               "2: D / (1 + c)", choices=(0, 1, 2)),
        Option("degenerate", "str", "definition", "when the hull of the gradients contains 0: "
               "the optimum of Eq. 3 (definition) or the mean gradient (official code)",
               choices=DEGENERATE),
    )

    c: float
    rescale: int
    degenerate: str

    def __init__(self, c: float = 0.5, rescale: int = 1, degenerate: str = "definition") -> None:
        self._set_options(c=c, rescale=rescale, degenerate=degenerate)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        T = M.shape[0]
        return cagrad_weights(M, np.full(T, 1.0 / T), self.c, self.rescale, self.degenerate)
