"""UPGrad: unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024; TorchJD; ``docs/methods.md#upgrad``, the projection in
``docs/methods.md#dual-cone``).

D = sum_i p_i pi_J(g_i), where pi_J(x) = argmin over {y : J y >= 0} of ||y - x||^2 projects onto
the dual cone of the rows of J and p is a preference vector (default 1/T). Gramian form:
pi_J(J^T u) = J^T v*(u) with v*(u) = argmin over v >= u of v^T M v, so the weights are
c = sum_i v*(p_i e_i). Each v* is a non-negative least squares problem solved exactly
(``solvers.dual_cone_weights``); no quadprog needed.

Property: J D = M c >= 0, every task improves to first order (KKT of each projection:
M v* >= 0). D = 0 only if every projection is 0, i.e. exactly where J is strongly stationary
(a strictly positive combination of the gradients vanishes: then {x : J x >= 0} is the null
space of J). At a weakly but not strongly stationary J some task can still improve and D != 0;
``dual_cone_weights`` keeps the multipliers bounded there (tests/test_stationarity.py).

Deviation (documented): TorchJD regularizes with M / tr(M) + 1e-4 I, which leaves conflicts of
order 1e-4 relative; here ``reg_eps`` defaults to 0 and the exact problem is solved, since the
solver handles a singular M. Pass ``reg_eps=1e-4`` to reproduce TorchJD. TorchJD also replaces
M by 0 when tr(M) < 1e-4 (an absolute threshold); here only tr(M) = 0 does, keeping D(sJ) = sD(J).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ShapeError
from ..linalg import to_numpy
from ..solvers import dual_cone_weights
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register


def preference_weights(method: str, pref_vector: Sequence[float] | None, T: int) -> np.ndarray:
    """The preference vector (default uniform 1/T), validated against T."""
    if pref_vector is None:
        return np.full(T, 1.0 / T)
    pref = to_numpy(pref_vector).reshape(-1)
    if pref.shape != (T,):
        raise ShapeError(f"{method}: pref_vector has {pref.size} entries for {T} tasks")
    return pref


@register
class UPGrad(GramianWeighting):
    """UPGrad (Jacobian Descent, TorchJD); see the module docstring.

    Options: ``pref_vector`` (default 1/T each), ``reg_eps`` (default 0, TorchJD 1e-4).
    Diagnostics: ``projection_coefficients`` (row i: v*(p_i e_i), so g_i projected onto the dual
    cone is J^T row).

    The mean of each gradient's projection onto the dual cone {x : J x >= 0}:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.UPGrad())
    tensor([0.4000, 0.7000])
    """

    name = "upgrad"
    summary = "Sum of each task gradient projected onto the dual cone of all gradients"
    paper = "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, 2024"
    family = "projection"

    OPTIONS = (
        Option("pref_vector", "float", None, "non-negative task preferences p (none: 1/T each)",
               low=0.0, nullable=True, shape="list"),
        Option("reg_eps", "float", 0.0, "added to the Gramian's diagonal before the "
               "projections (TorchJD: 1e-4)", low=0.0),
    )

    pref_vector: tuple[float, ...] | None
    reg_eps: float

    def __init__(self, pref_vector: Sequence[float] | None = None, reg_eps: float = 0.0) -> None:
        self._set_options(pref_vector=pref_vector, reg_eps=reg_eps)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        pref = preference_weights(self.name, self.pref_vector, M.shape[0])
        projections = dual_cone_weights(M, np.diag(pref), self.reg_eps)
        return projections.sum(axis=0), {"projection_coefficients": projections}
