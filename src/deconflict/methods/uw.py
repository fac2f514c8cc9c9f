"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018; ``docs/methods.md#uw``).

Loss sum_i 0.5 exp(-s_i) L_i + 0.5 s_i with learnable s_i = log sigma_i^2 (the paper's
regression form). The model's gradient is that of sum_i c_i L_i with c_i = 0.5 exp(-s_i); s
takes an Adam step with the closed-form gradient 0.5 - 0.5 exp(-s_i) L_i, whose zero is
exp(s_i) = L_i (so c_i tends to 1 / (2 L_i), a log-loss-like balancing). The weights of a step
use s before its update.

Options: ``lr`` = 0.025 (the separate learning rate of nash-mtl and the FAMO repository; LibMTL
trains s with the model's optimizer), ``init`` = 0 (nash-mtl, FAMO, CAGrad repos; LibMTL -0.5).
"""

from __future__ import annotations

import numpy as np

from ._task_parameters import LearnedWeighting
from .registry import register


@register
class UncertaintyWeighting(LearnedWeighting):
    """Uncertainty weighting; see the module docstring. Needs ``losses``.

    Diagnostics: ``s`` (log variances before this step's update).

    Weights 0.5 exp(-s), then one Adam step on s (the first loss, 1, is
    already at the optimum exp(s) = L of s = 0):

    >>> import deconflict
    >>> uw = deconflict.UncertaintyWeighting()
    >>> uw.weights(losses=[1.0, 2.0])
    tensor([0.5000, 0.5000], dtype=torch.float64)
    >>> uw.weights(losses=[1.0, 2.0])
    tensor([0.5000, 0.4877], dtype=torch.float64)
    """

    name = "uw"
    summary = "Learned homoscedastic-uncertainty weights 0.5 exp(-s_i), s_i = log sigma_i^2"
    paper = ("Kendall, Gal & Cipolla, Multi-Task Learning Using Uncertainty to Weigh Losses, "
             "CVPR 2018")

    def _weights_from(self, s: np.ndarray) -> np.ndarray:
        return 0.5 * np.exp(-s)

    def _gradient(self, s: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return 0.5 - 0.5 * np.exp(-s) * losses
