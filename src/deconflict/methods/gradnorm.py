"""GradNorm: gradient normalization (Chen et al., ICML 2018; ``docs/methods.md#gradnorm``).

Learn loss weights w (initialized at 1, renormalized to sum T) so that the weighted gradient
norms G_i = w_i nu_i, with nu_i = ||grad_W L_i|| on the last shared layer W, train at rates that
follow the tasks' relative progress:

    Ltilde_i = L_i(t) / L_i(0),  r_i = Ltilde_i / mean(Ltilde),  target_i = mean(G) r_i^alpha,
    L_grad = sum_i |G_i - target_i|   (target held constant),

so dL_grad / dw_i = sign(G_i - target_i) nu_i. Each step uses w(t) for the model (one backward
pass of sum_i w_i L_i), then takes one step of its own Adam optimizer on w and renormalizes
w <- T w / sum(w). The norms nu come from the Gramian of the last shared layer's per-task
gradients (its diagonal), which the engine computes with T cheap backward passes that stop at
that layer.

Options: ``alpha`` = 1.5 (asymmetry; LibMTL's default, the paper's NYUv2 value), ``lr`` = 0.025
(the weights' Adam learning rate), ``norms_on`` "last_layer" (paper; the last module of the
shared parameters, or the last tensor if they are not named) or "shared" (LibMTL: all shared
parameters, T full backward passes). L(0) is the loss of the first step (LibMTL uses the first
epoch's average). Weights are kept above 1e-6 before renormalization.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import ShapeError
from ._task_parameters import ADAM, TaskParameters
from .base import Context, Diagnostics, LossWeighting
from .options import Option
from .registry import register
from .state import StateField

_FLOOR = 1e-6


@register
class GradNorm(LossWeighting):
    """GradNorm (ICML 2018); see the module docstring. Needs ``losses``.

    Diagnostics: ``gradient_norms`` (nu), ``targets``, ``weighted_norms`` (G).

    The weights start at 1 and take an Adam step toward equal training rates:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> gradnorm = deconflict.GradNorm()
    >>> gradnorm.weights(J @ J.T, losses=[1.0, 2.0])
    tensor([1., 1.], dtype=torch.float64)
    >>> gradnorm.weights(J @ J.T, losses=[1.0, 1.0])
    tensor([1.0250, 0.9750], dtype=torch.float64)
    """

    name = "gradnorm"
    summary = "Learned loss weights that equalize the tasks' gradient norms and training rates"
    paper = ("Chen et al., GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep "
             "Multitask Networks, ICML 2018")
    stateful = True

    OPTIONS = (
        Option("alpha", "float", 1.5, "strength of the pull toward equal training rates",
               low=0.0),
        Option("lr", "float", 0.025, "Adam learning rate of the weights", low=0.0),
        Option("norms_on", "str", "last_layer", "the gradient norms of the last shared layer "
               "(paper) or of all shared parameters", choices=("last_layer", "shared")),
    )

    alpha: float
    lr: float
    norms_on: str

    STATE = (StateField("weights_", ADAM, key="weights"), StateField("initial_losses"))

    weights_: TaskParameters | None  # w, with its Adam state
    initial_losses: np.ndarray | None  # L(0)

    def __init__(
        self, alpha: float = 1.5, lr: float = 0.025,
        norms_on: Literal["last_layer", "shared"] = "last_layer",
    ) -> None:
        self._set_options(alpha=alpha, lr=lr, norms_on=norms_on)

    @property
    def gradient_scope(self) -> str:
        return self.norms_on

    @property
    def needs_losses(self) -> bool:
        return True

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        losses = context.losses
        assert M is not None and losses is not None
        T = losses.size
        if self.weights_ is None:
            self.weights_ = TaskParameters(np.ones(T), self.lr)
            self.initial_losses = np.where(np.abs(losses) > 0, losses, 1.0)
        self.weights_.check_tasks(self.name, T)
        if M.shape != (T, T):
            raise ShapeError(f"{self.name}: a Gramian of {M.shape[0]} tasks for {T} losses")
        w = self.weights_.values
        norms = np.sqrt(np.maximum(np.diag(M), 0.0))
        G = w * norms
        relative = losses / self.initial_losses
        rate = relative / relative.mean() if relative.mean() != 0 else np.ones(T)
        targets = G.mean() * np.sign(rate) * np.abs(rate) ** self.alpha
        self.weights_.step(np.sign(G - targets) * norms)
        updated = np.maximum(self.weights_.values, _FLOOR)
        self.weights_.assign(T * updated / updated.sum())
        return w, {"gradient_norms": norms, "targets": targets, "weighted_norms": G}
