"""GradVac: gradient vaccine (Wang et al., ICLR 2021; ``docs/methods.md#gradvac``).

For each task i and each other task j in random order (as PCGrad), with phi the cosine between
the current modified gradient g'_i and the original g_j and phihat_ij an exponential moving
average of that cosine: if phi < phihat_ij, add a g_j to g'_i with

    a = ||g'_i|| (phihat sqrt(1 - phi^2) - phi sqrt(1 - phihat^2)) / (||g_j|| sqrt(1 - phihat^2)),

after which cos(g'_i, g_j) = phihat exactly; then phihat_ij <- (1 - beta) phihat_ij + beta phi.
D = sum_i g'_i. With phihat fixed at 0 every step is PCGrad's projection.

Gramian form: g'_i = J^T c^(i), ||g'_i||^2 = c^T M c, g'_i . g_j = (M c)_j; a correction is
c^(i)_j += a. Per-layer GradVac (the paper's recommendation) runs the same on each group's
Gramian M^(k) and updates group k with its own weights: a ``BlockWeighting`` (with
``granularity="whole"`` a single group, ``single_group``).

Options: ``beta`` = 0.5 (LibMTL, SamsungLabs and TorchJD; the paper reportedly uses ~1e-2);
``granularity`` "whole" (default, LibMTL's 0), "layer" (each module with parameters: LibMTL's 1)
or "parameter" (each tensor: LibMTL's 2); ``ema`` "every_pair" (LibMTL, TorchJD: every pair's
target moves every step) or "on_correction" (SamsungLabs: only when a correction is applied, so
targets starting at 0 can only drift down); ``seed`` as PCGrad.

Edge cases: pairs with a zero gradient are skipped (cosine undefined); a target of exactly +-1
admits no correction (division by sqrt(1 - phihat^2) = 0) and is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from ..errors import ShapeError
from .base import BlockWeighting, Diagnostics, SeededRandomness
from .options import Option
from .registry import register
from .state import StateField


def vaccinate(
    M: np.ndarray, targets: np.ndarray, orders: list[np.ndarray], beta: float, ema: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """One GradVac step on one Gramian: (coefficient rows C, new targets, corrections).

    Row i of C gives g'_i = J^T C[i]; the weights are C.sum(axis=0).
    """
    T = M.shape[0]
    C = np.eye(T)
    targets = targets.copy()
    norms = np.sqrt(np.maximum(np.diag(M), 0.0))
    corrections = 0
    for i in range(T):
        row = C[i]
        dots = M @ row  # g'_i . g_j for every j
        for j in orders[i]:
            norm_i = math.sqrt(max(float(row @ dots), 0.0))
            if norm_i == 0.0 or norms[j] == 0.0:
                continue
            cosine = float(dots[j]) / (norm_i * norms[j])
            target = float(targets[i, j])
            corrected = False
            if cosine < target:
                sin_target = math.sqrt(max(1.0 - target * target, 0.0))
                if sin_target > 0.0:
                    sin_now = math.sqrt(max(1.0 - cosine * cosine, 0.0))
                    a = norm_i * (target * sin_now - cosine * sin_target) / (norms[j] * sin_target)
                    row[j] += a
                    dots += a * M[j]
                    corrected = True
                    corrections += 1
            if ema == "every_pair" or corrected:
                targets[i, j] = (1.0 - beta) * target + beta * cosine
    return C, targets, corrections


@register
class GradVac(SeededRandomness, BlockWeighting):
    """GradVac (ICLR 2021); see the module docstring.

    Diagnostics: ``corrections`` (count), ``targets`` (phihat after the step) and
    ``projection_coefficients`` (row i: g'_i = J^T row); per group for the block granularities.

    The targets start at 0, so the first step is PCGrad's projection:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.GradVac(seed=0))
    tensor([0.8000, 1.4000])
    """

    name = "gradvac"
    summary = "Steer each pair's gradient cosine toward a moving-average target (PCGrad-like)"
    paper = ("Wang et al., Gradient Vaccine: Investigating and Improving Multi-task Optimization "
             "in Massively Multilingual Models, ICLR 2021")
    family = "projection"
    stateful = True

    OPTIONS = (
        Option("beta", "float", 0.5, "moving-average factor of the target cosines", low=0.0,
               high=1.0),
        Option("granularity", "str", "whole", "one target per task pair for all shared "
               "parameters, per layer or per parameter tensor",
               choices=("whole", "layer", "parameter")),
        Option("ema", "str", "every_pair", "move every pair's target each step (LibMTL) or only "
               "when a correction is applied", choices=("every_pair", "on_correction")),
        Option("seed", "int", None, "a private random generator seeded with it (saved in the "
               "state); none: PyTorch's global RNG", nullable=True),
    )

    beta: float
    granularity: str
    ema: str
    seed: int | None

    STATE = (SeededRandomness.GENERATOR_STATE, StateField("targets"))

    targets: np.ndarray | None  # (groups, T, T)

    def __init__(
        self, beta: float = 0.5, granularity: Literal["whole", "layer", "parameter"] = "whole",
        ema: Literal["every_pair", "on_correction"] = "every_pair", seed: int | None = None,
    ) -> None:
        self._set_options(beta=beta, granularity=granularity, ema=ema, seed=seed)

    @property
    def single_group(self) -> bool:
        return self.granularity == "whole"

    def group_blocks(self, groups: Sequence[str]) -> list[int]:
        if self.granularity == "whole":
            return [0] * len(groups)
        if self.granularity == "parameter":
            return list(range(len(groups)))
        order: dict[str, int] = {}
        return [order.setdefault(key, len(order)) for key in groups]

    def _orders(self, T: int) -> list[np.ndarray]:
        orders = []
        for i in range(T):
            others = np.array([j for j in range(T) if j != i], dtype=int)
            orders.append(others[self._randperm(T - 1)])
        return orders

    def _targets(self, groups: int, T: int) -> np.ndarray:
        if self.targets is None:
            self.targets = np.zeros((groups, T, T))
        if self.targets.shape != (groups, T, T):
            raise ShapeError(
                f"this gradvac has targets for {self.targets.shape[0]} group(s) of "
                f"{self.targets.shape[1]} tasks and now gets {groups} of {T}; call reset()"
            )
        return self.targets

    def block_weights(
        self, gramians: np.ndarray, *, losses: Any = None
    ) -> tuple[np.ndarray, Diagnostics]:
        K, T, _ = gramians.shape
        targets = self._targets(K, T)
        rows = np.zeros((K, T, T))
        corrections = 0
        for k in range(K):
            rows[k], targets[k], count = vaccinate(gramians[k], targets[k], self._orders(T),
                                                   self.beta, self.ema)
            corrections += count
        return rows.sum(axis=1), {"corrections": corrections, "targets": targets.copy(),
                                  "projection_coefficients": rows}

    def _one_group(self, diagnostics: Diagnostics) -> Diagnostics:
        return {**diagnostics, "targets": diagnostics["targets"][0],
                "projection_coefficients": diagnostics["projection_coefficients"][0]}
