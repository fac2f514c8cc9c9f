"""MoCo: multi-objective gradient correction with tracking variables (Fernando et al.,
"Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach", ICLR
2023, Algorithm 1; LibMTL's MoCo; ``docs/methods.md#moco``).

The weights of a stochastic MGDA step are biased because they are computed from one mini-batch.
MoCo tracks each task's gradient with a moving average y_i and takes one projected gradient step
on the weights lambda per iteration instead of solving for them. At step k (from 1), with
h_i the task gradient of this mini-batch (rescaled, see below), beta_k = beta / k^beta_sigma and
gamma_k = gamma / k^gamma_sigma:

    y_i <- y_i - beta_k (y_i - h_i)                                      (y starts at 0)
    lambda <- Pi_simplex(lambda - gamma_k (Y Y^T + rho I) lambda)       (lambda starts at 1/T)
    D = Y^T lambda

(Y: the T x d matrix of the y_i; Pi the Euclidean projection onto the simplex). The update is
built from the tracked gradients, not this step's, so the state is T x d and the method needs
the gradients themselves (a ``JacobianAggregator``, like DB-MTL); ``state_dict`` saves y,
lambda and k exactly.

Options and defaults (LibMTL's, from the authors' code): ``beta`` = 0.5, ``beta_sigma`` = 0.5,
``gamma`` = 0.1, ``gamma_sigma`` = 0.5, ``rho`` = 0; ``normalize`` = True rescales each gradient
to h_i = L_i g_i / ||g_i|| as the authors' code and LibMTL do, which needs positive losses (a
negative one is refused: h_i would point uphill; the paper's algorithm uses
h_i = g_i: ``normalize=False``; a zero gradient stays zero, where LibMTL divides by
||g_i|| + 1e-8); ``lambda_update`` = "projection" is the paper's step, "softmax" LibMTL's
softmax(lambda - gamma_k (Y Y^T + rho I) lambda) in place of the projection. A single task gets
lambda = 1 and D = y_1, a positive multiple of its gradient on the first step.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidOptionError, ShapeError
from ._simplex import project_onto_simplex
from .base import Diagnostics, JacobianAggregator
from .famo import softmax
from .options import Option
from .registry import register
from .state import ARRAY, NUMBER, TENSORS, StateField


@register
class MoCo(JacobianAggregator):
    """MoCo (ICLR 2023, Algorithm 1); see the module docstring. Needs ``losses`` when
    ``normalize`` (the default).

    Diagnostics: ``lambda`` (the weights of the tracked gradients), ``beta`` and ``gamma``
    (this step's beta_k, gamma_k).

    The first step: h = ((1, 0), (0, 3)) (L_i g_i / ||g_i||), y = h / 2, Y Y^T = diag(1/4, 9/4);
    lambda = (1/2, 1/2) - 0.1 (1/8, 9/8) = (0.4875, 0.3875) projects onto (0.55, 0.45):

    >>> import torch, deconflict
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> method = deconflict.get("moco")
    >>> deconflict.aggregate(J, method, losses=[1.0, 3.0])
    tensor([0.2750, 0.6750], dtype=torch.float64)
    >>> method.state_dict()["lambda"]
    tensor([0.5500, 0.4500], dtype=torch.float64)
    """

    name = "moco"
    summary = "Tracked (averaged) task gradients, weights by one projected step per iteration"
    paper = ("Fernando et al., Mitigating Gradient Bias in Multi-objective Learning: A Provably "
             "Convergent Approach, ICLR 2023")
    family = "multi-objective"
    stateful = True

    OPTIONS = (
        Option("beta", "float", 0.5, "step size beta of the tracking variables", low=0.0,
               high=1.0, low_open=True),
        Option("beta_sigma", "float", 0.5, "decay of beta: beta_k = beta / k^beta_sigma",
               low=0.0),
        Option("gamma", "float", 0.1, "step size gamma of the weights lambda", low=0.0),
        Option("gamma_sigma", "float", 0.5, "decay of gamma: gamma_k = gamma / k^gamma_sigma",
               low=0.0),
        Option("rho", "float", 0.0, "l2 regularization rho of the weights' objective", low=0.0),
        Option("normalize", "bool", True, "track L_i g_i / ||g_i|| (authors' code, LibMTL) "
               "instead of g_i (the paper)"),
        Option("lambda_update", "str", "projection", "the weights' step: projected onto the "
               "simplex (the paper) or through a softmax (LibMTL)",
               choices=("projection", "softmax")),
    )

    beta: float
    beta_sigma: float
    gamma: float
    gamma_sigma: float
    rho: float
    normalize: bool
    lambda_update: str

    STATE = (StateField("tracked", TENSORS, key="y"), StateField("lam", ARRAY, key="lambda"),
             StateField("step", NUMBER))

    tracked: list[Tensor] | None  # y per block (T x d_k), in the gradients' dtype
    lam: np.ndarray | None
    step: int

    def __init__(
        self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
        gamma_sigma: float = 0.5, rho: float = 0.0, normalize: bool = True,
        lambda_update: Literal["projection", "softmax"] = "projection",
    ) -> None:
        self._set_options(beta=beta, beta_sigma=beta_sigma, gamma=gamma,
                          gamma_sigma=gamma_sigma, rho=rho, normalize=normalize,
                          lambda_update=lambda_update)

    @property
    def needs_losses(self) -> bool:
        return self.normalize

    @property
    def scales_task_gradients(self) -> bool:
        return False  # the update is built from the tracked gradients, not this step's

    def combine_jacobian(
        self, blocks: Sequence[Tensor], *, losses: np.ndarray | None,
        features: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], Diagnostics]:
        T = blocks[0].shape[0]
        if self.normalize and losses is None:
            raise ShapeError(f"{self.name} needs the losses to rescale the gradients")
        if self.normalize and not np.all(np.asarray(losses) > 0):
            # L_i g_i / ||g_i|| points uphill for a negative loss and vanishes for a zero one.
            bad = int(np.flatnonzero(~(np.asarray(losses) > 0))[0])
            raise InvalidOptionError(
                f"{self.name} with normalize=True tracks L_i g_i / ||g_i||, which needs positive "
                f"losses, got L_{bad} = {float(np.asarray(losses)[bad])!r}; pass "
                "normalize=False to track the gradients themselves")
        if self.tracked is None:
            self.tracked = [torch.zeros_like(block) for block in blocks]
        if [y.shape for y in self.tracked] != [b.shape for b in blocks]:
            raise ShapeError(f"{self.name}: the gradient blocks changed shape since the last "
                             "step; call reset() to start over")
        scales = torch.ones(T, dtype=torch.float64)
        if self.normalize:
            assert losses is not None
            squares = [block.double().pow(2).sum(dim=1).cpu() for block in blocks]
            norms = functools.reduce(torch.add, squares).sqrt()
            values = torch.from_numpy(np.asarray(losses, dtype=np.float64))
            scales = torch.where(norms > 0, values / torch.where(norms > 0, norms, 1.0), 0.0)
        self.step += 1
        beta = self.beta / self.step**self.beta_sigma
        gamma = self.gamma / self.step**self.gamma_sigma
        for y, block in zip(self.tracked, blocks, strict=True):
            h = block * scales.to(block.dtype).to(block.device)[:, None]
            y.sub_(y - h, alpha=beta)
        # Y Y^T in float64 whatever the gradients' dtype (docs/methods.md#gramian).
        gramian = functools.reduce(torch.add, [
            (y.double() @ y.double().T).cpu() for y in self.tracked]).numpy()
        lam = np.full(T, 1.0 / T) if self.lam is None else self.lam
        if lam.shape != (T,):
            raise ShapeError(f"{self.name}: the number of tasks changed from {lam.size} to {T}; "
                             "call reset() first")
        target = lam - gamma * (gramian @ lam + self.rho * lam)
        lam = project_onto_simplex(target) if self.lambda_update == "projection" \
            else softmax(target)
        self.lam = lam
        updates = [torch.from_numpy(lam).to(y.dtype).to(y.device) @ y for y in self.tracked]
        return updates, {"lambda": lam.copy(), "beta": beta, "gamma": gamma}
