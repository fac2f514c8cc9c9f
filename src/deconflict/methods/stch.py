"""Smooth Tchebycheff scalarization, STCH (Lin et al., "Smooth Tchebycheff Scalarization for
Multi-Objective Optimization", ICML 2024; docs/methods.md#stch).

The Tchebycheff scalarization max_i lambda_i (L_i - z_i) (a preference lambda, a reference
point z, ideally the ideal point) is smoothed by a log-sum-exp with smoothing mu > 0:

    g_mu(L) = mu log sum_i exp(lambda_i (L_i - z_i) / mu),

whose gradient is sum_i c_i grad L_i with

    c_i = lambda_i softmax_i(lambda (L - z) / mu)

(computed with the maximum subtracted, so any scale of the losses is safe). As mu -> 0 the
weight concentrates on the task of largest weighted excess (the Tchebycheff rule); as mu grows
the softmax tends to uniform and c -> lambda / T.

Defaults: mu = 1 (LibMTL's STCH_mu), lambda = 1/T each, z = 0. Deviation from the authors' MTL
code (and LibMTL): they sum the log losses during a warm-up of a few epochs, then apply STCH to
the log losses normalized by a nadir vector of warm-up averages; here the scalarization is of
the losses as given (pass ``reference`` for an ideal point, or train on log losses).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ShapeError
from .base import Context, Diagnostics, LossWeighting
from .options import Option
from .registry import register
from .upgrad import preference_weights


def reference_point(method: str, reference: Sequence[float] | None, T: int) -> np.ndarray:
    """The reference point z (default 0), validated against the number of tasks."""
    if reference is None:
        return np.zeros(T)
    if len(reference) != T:
        raise ShapeError(f"{method}: reference has {len(reference)} entries for {T} tasks")
    return np.array(reference, dtype=np.float64)


@register
class STCH(LossWeighting):
    """Smooth Tchebycheff scalarization (ICML 2024); see the module docstring. Needs
    ``losses``. Diagnostics: ``value`` (g_mu).

    >>> import deconflict
    >>> STCH(mu=1.0, pref_vector=[1.0, 1.0]).weights(losses=[0.0, 0.6931471805599453])
    tensor([0.3333, 0.6667], dtype=torch.float64)
    """

    name = "stch"
    summary = "Smooth Tchebycheff: log-sum-exp of the weighted losses above a reference point"
    paper = ("Lin et al., Smooth Tchebycheff Scalarization for Multi-Objective Optimization, "
             "ICML 2024")

    OPTIONS = (
        Option("mu", "float", 1.0, "smoothing: small values approach the max of the weighted "
               "losses", low=0.0, low_open=True),
        Option("pref_vector", "float", None, "the preference lambda, one per task (none: 1/T "
               "each)", low=0.0, nullable=True, shape="list"),
        Option("reference", "float", None, "the reference point z, one per task (none: 0)",
               nullable=True, shape="list"),
    )

    mu: float
    pref_vector: tuple[float, ...] | None
    reference: tuple[float, ...] | None

    def __init__(self, mu: float = 1.0, pref_vector: Sequence[float] | None = None,
                 reference: Sequence[float] | None = None) -> None:
        self._set_options(mu=mu, pref_vector=pref_vector, reference=reference)

    @property
    def needs_losses(self) -> bool:
        return True

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        losses = context.losses
        assert losses is not None
        T = losses.size
        pref = preference_weights(self.name, self.pref_vector, T)
        scaled = pref * (losses - reference_point(self.name, self.reference, T)) / self.mu
        top = float(scaled.max())
        exponentials = np.exp(scaled - top)
        total = float(exponentials.sum())
        value = self.mu * (top + float(np.log(total)))
        return pref * exponentials / total, {"value": value}
