"""Penalty-based boundary intersection, PBI (Zhang & Li, "MOEA/D: A Multiobjective Evolutionary
Algorithm Based on Decomposition", IEEE TEC 2007; docs/methods.md#pbi).

With the preference direction u = lambda / ||lambda||, a reference point z (ideally the ideal
point) and r = L - z, PBI scalarizes the losses as

    g(L) = d_1 + theta d_2,   d_1 = u . r,   d_2 = ||r - d_1 u||,

the progress along the preference ray plus theta times the distance from it. Its gradient is
sum_i c_i grad L_i with

    c = u + theta (r - d_1 u) / d_2,

since grad_r d_2 = (r - d_1 u) / d_2 (that vector is orthogonal to u). On the ray (d_2 = 0) the
distance term has no gradient and c = u (its subgradient of smallest norm). The weights of the
tasks ahead of the ray are negative: PBI trades them back to reach the preferred balance.

Defaults: theta = 5 (MOEA/D's setting), lambda = 1 each, z = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InvalidOptionError
from .base import Context, Diagnostics, LossWeighting
from .options import Option
from .registry import register
from .stch import reference_point
from .upgrad import preference_weights


@register
class PBI(LossWeighting):
    """Penalty-based boundary intersection (MOEA/D, IEEE TEC 2007); see the module docstring.
    Needs ``losses``. Diagnostics: ``d1``, ``d2`` (the distances along and from the ray).

    >>> import deconflict
    >>> PBI(theta=5.0).weights(losses=[3.0, 1.0]).tolist()  # (1, 1) / sqrt 2 + 5 (1, -1) / sqrt 2
    [4.242640687119286, -2.8284271247461885]
    """

    name = "pbi"
    summary = "Progress along a preference ray plus theta times the distance from it (MOEA/D)"
    paper = ("Zhang & Li, MOEA/D: A Multiobjective Evolutionary Algorithm Based on "
             "Decomposition, IEEE TEC 2007")

    OPTIONS = (
        Option("theta", "float", 5.0, "penalty on the distance from the preference ray",
               low=0.0),
        Option("pref_vector", "float", None, "the preference direction lambda, one per task "
               "(none: all 1)", low=0.0, nullable=True, shape="list"),
        Option("reference", "float", None, "the reference point z, one per task (none: 0)",
               nullable=True, shape="list"),
    )

    theta: float
    pref_vector: tuple[float, ...] | None
    reference: tuple[float, ...] | None

    def __init__(self, theta: float = 5.0, pref_vector: Sequence[float] | None = None,
                 reference: Sequence[float] | None = None) -> None:
        self._set_options(theta=theta, pref_vector=pref_vector, reference=reference)

    @property
    def needs_losses(self) -> bool:
        return True

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        losses = context.losses
        assert losses is not None
        T = losses.size
        pref = np.ones(T) if self.pref_vector is None else preference_weights(
            self.name, self.pref_vector, T)
        length = float(np.linalg.norm(pref))
        if length == 0.0:
            raise InvalidOptionError(f"{self.name}: pref_vector must not be all zero")
        u = pref / length
        r = losses - reference_point(self.name, self.reference, T)
        d1 = float(u @ r)
        off_ray = r - d1 * u
        d2 = float(np.linalg.norm(off_ray))
        c = u + self.theta * off_ray / d2 if d2 > 0.0 else u.copy()
        return c, {"d1": d1, "d2": d2}
