"""ExcessMTL: robust multi-task learning with excess risks (He et al., "Robust Multi-Task
Learning with Excess Risks", ICML 2024; TorchJD's ExcessMTL; ``docs/methods.md#excess_mtl``).

The tasks are weighted by their excess risk (how far each is from its own optimum) rather than
their loss, so a task with large irreducible noise does not take over. Per step k, with g_i the
task gradient (d entries) and S_i the running sum of its squared entries (an AdaGrad estimate of
a diagonal Hessian, Eq. 7):

    S_i <- S_i + g_i^2                                    (entrywise; S starts at 0)
    e_i = sum_j g_ij^2 / sqrt(S_ij + 1e-7)                (Eq. 6: g_i^T H_i^-1 g_i)
    e_i <- e_i / (e_i^(0) + 1e-7)                         (scale processing, Section 3.2)
    w <- softmax(log w + eta e)                           (Eq. 9, exponentiated gradient)
    D = J^T w

with w starting at 1/T (the paper; the official code and LibMTL start at 1) and e^(0) the
baseline: with ``n_warmup_steps`` = 0 (default) the first step's e, which that step uses
unnormalized (the official code and LibMTL); otherwise the mean e over the warm-up steps, during
which w stays 1/T (the paper's Appendix C.1 recommends three epochs). The exponentiated step is
taken in log space (a softmax), so a huge excess saturates the weights instead of overflowing.
``robust_step_size`` eta = 1 (TorchJD's default). The 1e-7 terms are the authors' (kept for
parity): they make the method not scale free. S is a T x d buffer in the gradients' dtype, so
the method needs the gradients themselves (a ``JacobianAggregator``); ``state_dict`` saves it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ShapeError
from .base import Diagnostics, JacobianAggregator
from .famo import softmax
from .options import Option
from .registry import register
from .state import NUMBER, TENSORS, StateField

_EPS = 1e-7


@register
class ExcessMTL(JacobianAggregator):
    """ExcessMTL (ICML 2024, Eq. 6-9); see the module docstring.

    Diagnostics: ``excess`` (this step's e, after the scale processing), ``task_weights`` (w).

    The first step: S = g^2, e_i = sum_j |g_ij| (up to the 1e-7), here e = (2, 1), used raw:
    w = softmax(log(1/2) + (2, 1)) = (e / (e + 1), 1 / (e + 1)):

    >>> import torch, deconflict
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> deconflict.aggregate(J, deconflict.get("excess_mtl"))
    tensor([1.4621, 0.2689], dtype=torch.float64)
    """

    name = "excess_mtl"
    summary = "Weights by exponentiated excess risks (AdaGrad-preconditioned gradient norms)"
    paper = "He et al., Robust Multi-Task Learning with Excess Risks, ICML 2024"
    family = "multi-objective"
    stateful = True

    OPTIONS = (
        Option("robust_step_size", "float", 1.0, "step size eta of the exponentiated weight "
               "update", low=0.0, low_open=True),
        Option("n_warmup_steps", "int", 0, "steps with uniform weights that set the baseline "
               "excess risk (0: the first step's)", low=0),
    )

    robust_step_size: float
    n_warmup_steps: int

    STATE = (StateField("squares", TENSORS), StateField("task_weights"),
             StateField("baseline"), StateField("warmup_sum"), StateField("step", NUMBER))

    squares: list[Tensor] | None  # S per block (T x d_k), in the gradients' dtype
    task_weights: np.ndarray | None
    baseline: np.ndarray | None
    warmup_sum: np.ndarray | None
    step: int

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        self._set_options(robust_step_size=robust_step_size, n_warmup_steps=n_warmup_steps)

    def combine_jacobian(
        self, blocks: Sequence[Tensor], *, losses: np.ndarray | None,
        features: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], Diagnostics]:
        T = blocks[0].shape[0]
        if self.squares is None:
            self.squares = [torch.zeros_like(block) for block in blocks]
            self.task_weights = np.full(T, 1.0 / T)
            self.warmup_sum = np.zeros(T)
        if [s.shape for s in self.squares] != [b.shape for b in blocks]:
            raise ShapeError(f"{self.name}: the gradient blocks changed shape since the last "
                             "step; call reset() to start over")
        assert self.task_weights is not None and self.warmup_sum is not None
        excess_parts = []
        for square, block in zip(self.squares, blocks, strict=True):
            block_squared = block.pow(2)
            square.add_(block_squared)
            excess_parts.append((block_squared / (square + _EPS).sqrt()).double().sum(dim=1).cpu())
        excess = functools.reduce(torch.add, excess_parts).numpy()
        self.step += 1
        if self.step <= self.n_warmup_steps:
            self.warmup_sum = self.warmup_sum + excess
        else:
            if self.baseline is None:
                if self.n_warmup_steps > 0:
                    self.baseline = self.warmup_sum / self.n_warmup_steps
                    excess = excess / (self.baseline + _EPS)
                else:
                    self.baseline = excess  # the first step's excess, used as it is
            else:
                excess = excess / (self.baseline + _EPS)
            with np.errstate(divide="ignore"):  # a weight that underflowed to 0 stays 0
                self.task_weights = softmax(np.log(self.task_weights)
                                            + self.robust_step_size * excess)
        w = self.task_weights
        updates = [torch.from_numpy(w).to(b.dtype).to(b.device) @ b for b in blocks]
        return updates, {"excess": excess, "task_weights": w.copy()}
