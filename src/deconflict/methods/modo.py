"""MoDo: multi-objective gradient with double sampling (Chen, Fernando et al., "Three-Way
Trade-Off in Multi-Objective Learning: Optimization, Generalization and Conflict-Avoidance",
NeurIPS 2023 / JMLR 2024, Algorithm 1; TorchJD's MoDoWeighting; ``docs/methods.md#modo``).

MoDo takes one projected gradient step per iteration on the weights lambda of the MGDA
objective 1/2 ||J^T lambda||^2 + rho/2 ||lambda||^2 (Eq. 2.9a), then steps along J^T lambda:

    lambda <- Pi_simplex(lambda - gamma (J_1 J_2^T lambda + rho lambda)),   D = J_3^T lambda,

where the paper's J_1, J_2 (and J_3) are the task Jacobians of independent mini-batches, so that
J_1 J_2^T is an unbiased estimate of the Gramian (the "double sampling"). Deviation: one
``backward`` call sees one mini-batch, so here J_1 = J_2 = J_3 = J and the step uses its Gramian
M = J J^T, the single-batch form that TorchJD's weighting computes when given J J^T (and that
LibMTL computes when its three batches coincide); the unbiasedness that the paper's analysis
needs is lost, the update rule is the same. lambda starts at 1/T and is the method's state.

Defaults: gamma = 0.1, rho = 0.1 (TorchJD; the paper's experiments tune gamma, LibMTL's default
is gamma = 0.001). The step is not scale free: gamma multiplies M, whose scale is the gradients'
squared (D(sJ) != s D(J)). A single task keeps lambda = 1.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ._simplex import project_onto_simplex
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register
from .state import StateField


@register
class MoDo(GramianWeighting):
    """MoDo (NeurIPS 2023, Algorithm 1), single-batch form; see the module docstring.

    Diagnostics: none beyond the weights (lambda, which is also the state).

    From lambda = (1/2, 1/2) on M = diag(1, 4): (1/2, 1/2) - 0.1 ((1/2, 2) + 0.1 (1/2, 1/2)) =
    (0.445, 0.295), projected onto the simplex (each + 0.13):

    >>> import numpy as np, deconflict
    >>> deconflict.get("modo").weights(np.diag([1.0, 4.0]))
    tensor([0.5750, 0.4250], dtype=torch.float64)
    """

    name = "modo"
    summary = "One projected step per iteration on the MGDA weights (single-batch MoDo)"
    paper = ("Chen et al., Three-Way Trade-Off in Multi-Objective Learning: Optimization, "
             "Generalization and Conflict-Avoidance, NeurIPS 2023")
    family = "multi-objective"
    stateful = True

    OPTIONS = (
        Option("gamma", "float", 0.1, "step size gamma of the weights lambda", low=0.0,
               low_open=True),
        Option("rho", "float", 0.1, "l2 regularization rho of the weights' objective", low=0.0),
    )

    STATE = (StateField("lam", key="lambda"),)

    gamma: float
    rho: float
    lam: np.ndarray | None

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        self._set_options(gamma=gamma, rho=rho)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        T = M.shape[0]
        lam = np.full(T, 1.0 / T) if self.lam is None else self.lam
        if lam.shape != (T,):
            raise ShapeError(f"{self.name}: the number of tasks changed from {lam.size} to {T}; "
                             "call reset() first")
        lam = project_onto_simplex(lam - self.gamma * (M @ lam + self.rho * lam))
        self.lam = lam
        return lam.copy(), {}
