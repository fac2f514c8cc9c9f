"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023; ``docs/methods.md#db_mtl``).

Balance loss scales by working on log losses, and gradient magnitudes by rescaling every task's
(averaged) gradient to the largest norm. Per step k, with gl_i = grad log(L_i + eps)
= g_i / (L_i + eps) and beta_k = beta / k^sigma:

    Ghat_i <- beta_k Ghat_i + (1 - beta_k) gl_i        (Ghat starts at 0, no bias correction)
    a_i = max_j ||Ghat_j|| / ||Ghat_i||                 (0 for an all-zero average)
    D = sum_i a_i Ghat_i

The update uses the moving averages, not the raw gradients, so the state is a T x d buffer and
the method needs the task gradients themselves (a ``JacobianAggregator``); the buffer is saved by
``state_dict``. The task heads are trained on the log losses (weights 1 / (L_i + eps)), as in
LibMTL. Options (LibMTL defaults): ``beta`` = 0.9, ``sigma`` = 0, ``eps`` = 1e-8.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ShapeError
from .base import Diagnostics, JacobianAggregator
from .options import Option
from .registry import register
from .state import NUMBER, TENSORS, StateField


@register
class DBMTL(JacobianAggregator):
    """DB-MTL; see the module docstring. Needs ``losses``.

    Diagnostics: ``scales`` (a_i), ``average_norms`` (||Ghat_i||), ``beta`` (beta_k).

    The first step: the averages (1 - beta) g_i / L_i, each rescaled to the largest norm:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.DBMTL(), losses=[1.0, 2.0])
    tensor([0.0553, 0.0894])
    """

    name = "db_mtl"
    summary = "Log losses, with each task's averaged gradient rescaled to the largest norm"
    paper = "Lin et al., Dual-Balancing for Multi-Task Learning, 2023"
    family = "loss weighting"
    stateful = True

    @property
    def scales_task_gradients(self) -> bool:
        return False  # the update is built from modified gradients, not reported per task

    OPTIONS = (
        Option("beta", "float", 0.9, "moving-average factor beta of the log-loss gradients",
               low=0.0, high=1.0),
        Option("sigma", "float", 0.0, "decay of the factor: beta_k = beta / k^sigma", low=0.0),
        Option("eps", "float", 1e-8, "eps in log(L_i + eps)", low=0.0),
    )

    beta: float
    sigma: float
    eps: float

    STATE = (StateField("averages", TENSORS), StateField("step", NUMBER))

    averages: list[Tensor] | None  # Ghat_i per block (T x d_k), in the gradients' dtype
    step: int

    def __init__(self, beta: float = 0.9, sigma: float = 0.0, eps: float = 1e-8) -> None:
        self._set_options(beta=beta, sigma=sigma, eps=eps)

    @property
    def needs_losses(self) -> bool:
        return True

    def head_coefficients(self, weights: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        return 1.0 / (losses + self.eps)

    def combine_jacobian(
        self, blocks: Sequence[Tensor], *, losses: np.ndarray | None,
        features: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], Diagnostics]:
        if losses is None:
            raise ShapeError(f"{self.name} needs the losses")
        if self.averages is None:
            self.averages = [torch.zeros_like(block) for block in blocks]
        if [a.shape for a in self.averages] != [b.shape for b in blocks]:
            raise ShapeError(f"{self.name}: the gradient blocks changed shape since the last "
                             "step; call reset() to start over")
        self.step += 1
        beta = self.beta / self.step**self.sigma
        for average, block in zip(self.averages, blocks, strict=True):
            log_gradient = block / torch.as_tensor(losses + self.eps, dtype=block.dtype,
                                                   device=block.device)[:, None]
            average.mul_(beta).add_(log_gradient, alpha=1.0 - beta)
        squares = [average.double().pow(2).sum(dim=1) for average in self.averages]
        norms = functools.reduce(torch.add, squares).sqrt()
        # An all-zero average contributes nothing whatever its scale, so only zero is guarded
        # (LibMTL adds 1e-8, which stops being negligible for norms near 1e-8 and below).
        scales = torch.where(norms > 0, norms.max() / torch.where(norms > 0, norms, 1.0), 0.0)
        updates = [scales.to(a.dtype).to(a.device) @ a for a in self.averages]
        return updates, {"scales": scales.cpu().numpy(), "average_norms": norms.cpu().numpy(),
                         "beta": beta}
