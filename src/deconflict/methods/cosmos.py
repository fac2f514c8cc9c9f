"""COSMOS: the cosine-penalized linear scalarization (Ruchte & Grabocka, "Scalable Pareto Front
Approximation for Deep Multi-Objective Learning", ICDM 2021; TorchJD's COSMOS scalarizer;
``docs/methods.md#cosmos``).

With a preference vector r and the losses L, the objective (Eq. 3 of the paper) is

    f(L) = r . L - lambda cos(r, L),    cos(r, L) = r . L / (||r|| ||L||).

It depends on the losses alone, so it is a loss weighting whose weights are its gradient with
respect to each loss (the chain rule gives grad f = sum_i (df/dL_i) g_i):

    c_i = df/dL_i = r_i - lambda (r_i / (||r|| ||L||) - cos(r, L) L_i / ||L||^2).

The penalty pulls the vector of losses towards the ray of r: c_i - r_i = -(lambda / ||L||)
(r_i / ||r|| - cos(r, L) L_i / ||L||), so a weight is lowered (even below zero: that loss is
then pushed up) where L_i is small for its share of the preference and raised where it is
large; the penalty's part sums to zero against L: sum_i (c_i - r_i) L_i = 0. lambda = 0 is
the linear scalarization r . L; a single task gets c = r_1 (its cosine is 1 whatever L). The
weights do not change when J is scaled (the update is homogeneous) and are free of the task
order for a permuted r. ||L|| = 0 leaves the cosine undefined and is refused.

The paper also feeds r to the network and samples it from a Dirichlet distribution at every
step, to learn the whole Pareto front with one model; both are choices of the training loop: set
``method.pref_vector`` before each step to follow them. Defaults: lambda = 2 (the authors'
settings for their image data sets, Multi-MNIST, Multi-Fashion; they use 0.01 on the tabular
ones and up to 8; TorchJD has no default) and r = (1/T, ..., 1/T) (the mean of their Dirichlet
samples; TorchJD requires r).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InvalidOptionError
from .base import Context, Diagnostics, LossWeighting
from .options import Option
from .registry import register
from .upgrad import preference_weights


def cosmos_weights(losses: np.ndarray, pref: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """c = grad of r . L - lambda cos(r, L) with respect to L, and cos(r, L)."""
    # Scaled by the largest |L_i| and |r_i| first, so that no square over- or underflows.
    scale_l = float(np.max(np.abs(losses)))
    scale_r = float(np.max(np.abs(pref)))
    u, v = losses / scale_l, pref / scale_r
    norm_u, norm_v = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    cosine = float(u @ v) / (norm_u * norm_v)
    # d cos / dL_i = r_i / (||r|| ||L||) - cos L_i / ||L||^2, written in the scaled vectors.
    gradient = (v / norm_v - cosine * u / norm_u) / (norm_u * scale_l)
    return pref - lam * gradient, cosine


@register
class COSMOS(LossWeighting):
    """COSMOS (ICDM 2021, Eq. 3): the gradient of r . L - lambda cos(r, L) as loss weights; see
    the module docstring. Needs ``losses``.

    Options: ``lam`` (lambda, >= 0, default 2), ``pref_vector`` (r, default 1/T each).
    Diagnostics: ``cosine`` (cos(r, L)).

    On the ray of r the penalty's gradient vanishes; off it, the loss below its share loses
    weight (here so much that descent raises it, towards the ray):

    >>> import deconflict
    >>> deconflict.get("cosmos", lam=1.0).weights(losses=[1.0, 1.0])
    tensor([0.5000, 0.5000], dtype=torch.float64)
    >>> deconflict.get("cosmos", lam=1.0).weights(losses=[1.0, 0.0])
    tensor([ 0.5000, -0.2071], dtype=torch.float64)
    """

    name = "cosmos"
    summary = "Linear scalarization minus lambda cos(r, L), a pull towards the preference ray"
    paper = ("Ruchte & Grabocka, Scalable Pareto Front Approximation for Deep Multi-Objective "
             "Learning, ICDM 2021")

    OPTIONS = (
        Option("lam", "float", 2.0, "weight lambda of the cosine penalty", low=0.0),
        Option("pref_vector", "float", None, "the preference vector r, one per task (none: "
               "1/T each)", low=0.0, nullable=True, shape="list"),
    )

    lam: float
    pref_vector: tuple[float, ...] | None

    def __init__(self, lam: float = 2.0, pref_vector: Sequence[float] | None = None) -> None:
        self._set_options(lam=lam, pref_vector=pref_vector)

    @property
    def needs_losses(self) -> bool:
        return True

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        losses = context.losses
        assert losses is not None
        pref = preference_weights(self.name, self.pref_vector, context.num_tasks)
        if not (losses != 0.0).any():
            raise InvalidOptionError(f"{self.name}: cos(r, L) is undefined when every loss is 0")
        if not (pref != 0.0).any():
            raise InvalidOptionError(f"{self.name}: cos(r, L) is undefined for r = 0")
        weights, cosine = cosmos_weights(losses, pref, self.lam)
        return weights, {"cosine": cosine}
