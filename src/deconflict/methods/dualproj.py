"""DualProj: the preferred combination projected onto the dual cone (Quinton & Rey, 2024;
TorchJD; METHODS.md Section 15, "the one-QP sibling" of UPGrad).

D = pi_J(J^T p): the projection of the preference-weighted gradient (default the mean) onto the
dual cone {x : J x >= 0}. Weights c = v*(p) with v*(u) = argmin over v >= u of v^T M v, solved
exactly (``solvers.dual_cone_weights``). Property: J D >= 0. Same ``reg_eps`` convention as
UPGrad (default 0, exact; TorchJD uses 1e-4).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..solvers import dual_cone_weights
from .base import Context, Diagnostics, Method, bounded_option
from .registry import register
from .upgrad import check_preference, preference_weights


@register
class DualProj(Method):
    """DualProj (TorchJD); see the module docstring. Options: ``pref_vector``, ``reg_eps``."""

    name = "dualproj"
    summary = "The mean gradient projected onto the dual cone of all gradients"
    paper = "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, 2024"
    family = "projection"

    def __init__(self, pref_vector: Sequence[float] | None = None, reg_eps: float = 0.0) -> None:
        self.pref_vector = check_preference(self.name, pref_vector)
        self.reg_eps = bounded_option(self.name, "reg_eps", reg_eps, 0.0)

    def options(self) -> dict[str, object]:
        return {"pref_vector": self.pref_vector, "reg_eps": self.reg_eps}

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        assert M is not None
        pref = preference_weights(self.name, self.pref_vector, M.shape[0])
        return dual_cone_weights(M, pref[None, :], self.reg_eps)[0], {}
