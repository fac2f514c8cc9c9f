"""Geometric mean of the losses: the geometric loss strategy, GLS (Chennupati et al.,
"MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
Learning", CVPR Workshops 2019; LibMTL's GLS; TorchJD's GeometricMean scalarizer;
docs/methods.md#geometric_mean).

The objective is G = (prod_i L_i)^(1/T). Its gradient is a weighted sum of the task gradients,

    grad G = sum_i (G / (T L_i)) grad L_i,

so this is a loss weighting with c_i = G / (T L_i), computed as exp(mean_j log L_j - log L_i)
/ T (no product that could overflow). A task's weight is inversely proportional to its loss, so
every task counts by its relative progress: the update is that of sum_i log L_i scaled by G / T.
Multiplying one loss by s > 0 multiplies the whole update by s^(1/T) and leaves its direction
unchanged. The losses must be positive (G's gradient is not defined at L_i = 0 for T > 1);
a single task gets c = 1.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidOptionError
from .base import Context, Diagnostics, LossWeighting
from .registry import register


@register
class GeometricMean(LossWeighting):
    """Geometric mean of the losses (GLS); see the module docstring. Needs ``losses``.

    Diagnostics: ``geometric_mean`` (G).

    >>> import deconflict
    >>> GeometricMean().weights(losses=[1.0, 4.0])  # G = 2: c = (2 / 2, 2 / 8)
    tensor([1.0000, 0.2500], dtype=torch.float64)
    """

    name = "geometric_mean"
    summary = "Geometric mean of the losses (prod L_i)^(1/T): weights G / (T L_i)"
    paper = ("Chennupati et al., MultiNet++: Multi-Stream Feature Aggregation and Geometric "
             "Loss Strategy for Multi-Task Learning, CVPR Workshops 2019")

    @property
    def needs_losses(self) -> bool:
        return True

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        losses = context.losses
        assert losses is not None
        if (losses <= 0.0).any():
            bad = int(np.flatnonzero(losses <= 0.0)[0])
            raise InvalidOptionError(
                f"{self.name} needs positive losses (its weights are G / (T L_i)), got "
                f"L_{bad} = {float(losses[bad])!r}")
        logs = np.log(losses)
        mean_log = float(logs.mean())
        weights = np.exp(mean_log - logs) / losses.size
        return weights, {"geometric_mean": float(np.exp(mean_log))}
