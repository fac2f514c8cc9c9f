"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020, Algorithm 1;
``docs/methods.md#pcgrad``).

For each task i, in a random order of the *other* tasks j, if the current g^pc_i conflicts with
the original g_j, remove that component: g^pc_i <- g^pc_i - (g^pc_i . g_j / ||g_j||^2) g_j
(paper Algorithm 1). The update is the sum D = sum_i g^pc_i.

Gramian form: g^pc_i = J^T c^(i) with c^(i) starting at e_i; g^pc_i . g_j = (M c^(i))_j, so a
projection is c^(i)_j -= (M c^(i))_j / M_jj. Zero gradients (M_jj = 0) are skipped.

Conventions (``docs/methods.md#pcgrad``): self is excluded from the partner list, as in the
paper and TorchJD (LibMTL and the official TF code include it, which matters only in rare
cases); the result is a sum, as in the paper.
"""

from __future__ import annotations

import numpy as np

from ..linalg import normalized
from ._zero_update import note_zero_update
from .base import Context, Diagnostics, GramianWeighting, SeededRandomness
from .options import Option
from .registry import register


def pcgrad_weights(M: np.ndarray, orders: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the PCGrad coefficient rows, for given partner orders (orders[i] excludes i).

    Returns (c, C) with C[i] the coefficients of g^pc_i.
    """
    G, _ = normalized(M)
    T = G.shape[0]
    C = np.eye(T)
    diag = np.diag(G)
    for i in range(T):
        row = C[i]
        for j in orders[i]:
            if diag[j] <= 0.0:
                continue
            dot = float(G[j] @ row)
            if dot < 0.0:
                row[j] -= dot / diag[j]
    return C.sum(axis=0), C


@register
class PCGrad(SeededRandomness, GramianWeighting):
    """PCGrad (Yu et al., NeurIPS 2020, Algorithm 1), summed; see the module docstring.

    Options: ``seed``: with an int, the partner orders come from a private generator seeded
    with it, saved by ``state_dict()``; with None (default) they come from PyTorch's global RNG,
    so ``torch.manual_seed`` makes runs reproducible. With T <= 2 no random number is drawn.

    Diagnostics: ``projection_coefficients`` (row i: g^pc_i = J^T row), ``orders``,
    ``zero_update``: None, or "stationary" (zero at a strongly Pareto-stationary J) or
    "cancelled" (the g^pc_i cancel elsewhere; a ``ZeroUpdateWarning`` once per instance).

    Each gradient loses its component along the other (T = 2 draws no random order):

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.PCGrad(seed=0))
    tensor([0.8000, 1.4000])
    """

    name = "pcgrad"
    summary = "Project each gradient off the others it conflicts with, in random order, and sum"
    paper = "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020"
    family = "projection"

    OPTIONS = (
        Option("seed", "int", None, "the partner orders from a private generator seeded with "
               "it (saved in the state); none: PyTorch's global RNG", nullable=True),
    )

    seed: int | None

    STATE = (SeededRandomness.GENERATOR_STATE,)

    def __init__(self, seed: int | None = None) -> None:
        self._set_options(seed=seed)

    def _orders(self, T: int) -> list[np.ndarray]:
        if T <= 2:
            return [np.array([j for j in range(T) if j != i], dtype=int) for i in range(T)]
        orders = []
        for i in range(T):
            perm = self._randperm(T - 1)
            others = np.array([j for j in range(T) if j != i], dtype=int)
            orders.append(others[perm])
        return orders

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        orders = self._orders(M.shape[0])
        c, C = pcgrad_weights(M, orders)
        diagnostics: Diagnostics = {"projection_coefficients": C, "orders": np.array(orders)}
        note_zero_update(self, M, c, diagnostics, "cancelled",
                         "the projected gradients g^pc_i cancel in the sum")
        return c, diagnostics
