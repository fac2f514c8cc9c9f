"""SI-LS: the scale-invariant sum of log losses (the "SI" baseline of Liu et al., "FAMO: Fast
Adaptive Multitask Optimization", NeurIPS 2023; ``docs/methods.md#si_ls``).

The objective is sum_i log L_i. Its gradient is sum_i g_i / L_i, so this is a loss weighting
with

    c_i = 1 / L_i

(one ordinary backward pass of sum_i c_i L_i, the heads included). Multiplying a loss by
s_i > 0 multiplies its gradient by s_i and its weight by 1 / s_i: the update does not depend on
the losses' scales, which is the point of the log. It is ``log_losses`` with the sum as the base
(``docs/methods.md#log_losses``), and, up to the factor G / T, the gradient of the geometric
mean (``geometric_mean``). The losses must be positive; a non-positive one is refused by name.
"""

from __future__ import annotations

import numpy as np

from .base import Context, Diagnostics, LossWeighting
from .log_losses import inverse_losses
from .registry import register


@register
class SILS(LossWeighting):
    """SI-LS, the sum of the log losses: c_i = 1 / L_i; see the module docstring. Needs
    ``losses`` (positive).

    >>> import deconflict
    >>> deconflict.get("si_ls").weights(losses=[0.5, 4.0])
    tensor([2.0000, 0.2500], dtype=torch.float64)
    """

    name = "si_ls"
    summary = "Scale-invariant sum of the log losses: weights 1 / L_i"
    paper = ("Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023 (the SI "
             "baseline)")

    @property
    def needs_losses(self) -> bool:
        return True

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        return inverse_losses(self.name, context.losses), {}
