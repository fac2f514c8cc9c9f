"""DualProj: the preferred combination projected onto the dual cone (Quinton & Rey, 2024;
TorchJD; the one-QP sibling of UPGrad; ``docs/methods.md#dualproj``, the projection in
``docs/methods.md#dual-cone``).

D = pi_J(J^T p): the projection of the preference-weighted gradient (default the mean) onto the
dual cone {x : J x >= 0}. Weights c = v*(p) with v*(u) = argmin over v >= u of v^T M v, solved
exactly (``solvers.dual_cone_weights``). Property: J D >= 0. Same ``reg_eps`` convention as
UPGrad (default 0, exact; TorchJD uses 1e-4).
"""

from __future__ import annotations

import numpy as np

from ..solvers import dual_cone_weights
from .base import Context, Diagnostics
from .registry import register
from .upgrad import UPGrad, preference_weights


@register
class DualProj(UPGrad):
    """DualProj (TorchJD); see the module docstring. Options as UPGrad: ``pref_vector``,
    ``reg_eps``.

    The mean gradient conflicts with no task here, so it is its own projection:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.DualProj())
    tensor([0.2500, 0.5000])
    """

    name = "dualproj"
    summary = "The mean gradient projected onto the dual cone of all gradients"

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        pref = preference_weights(self.name, self.pref_vector, M.shape[0])
        return dual_cone_weights(M, pref[None, :], self.reg_eps)[0], {}
