"""The conflict diagnostics of one training step, from what the engine already computed.

A ``StepRecord`` holds the Gramian M = J J^T, each shared layer's Gramian M^(k), the task weights
and J D (each task gradient dotted with the update D). Everything below is T x T arithmetic on
those, so it costs nothing next to the step itself:

- cosines K = N^-1 M N^-1, N = diag(n), n_i = ||g_i|| (whole model), and K^(k) per shared layer
  (a module's weight and bias together: Recon's layer-wise cosines, slides Definition 2); a zero
  gradient has cosine 0 with everything;
- conflicting pairs: i < j with cos(g_i, g_j) < 0 (Recon Definition 1);
- weak conflict: the update conflicts with some original gradient, g_j . D < 0 (GradOPS
  Section 3: "weak non-conflict" is its absence);
- strong conflict: some modified gradient g'_i conflicts with some original g_j, g'_i . g_j < 0
  (GradOPS Definition of "strong non-conflict"). With g'_i = J^T C_i, g'_i . g_j = (C M)_ij. C is
  the method's ``projection_coefficients`` (GradOPS, PCGrad, GradVac, UPGrad) or diag(c) when the
  method only scales the task gradients (scalarization, loss weighting, MGDA, IMTL-G, CAGrad,
  ...); for other methods it is unknown (None);
- update projections p_i = g_i . D / ||g_i||: how far the update goes along each task's gradient,
  so a step of size lr lowers L_i by about lr n_i p_i.

Comparisons with zero carry a relative tolerance (1e-8 of the product of the norms) so that a
product zero up to rounding (an exact projection) does not count as a conflict. The definitions
are those of docs/methods.md#stationarity and docs/methods.md#notation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..linalg import cosine_matrix, task_norms
from ..record import StepRecord

TOLERANCE = 1e-8


@dataclass(frozen=True)
class StepConflicts:
    """The conflict diagnostics of one step (see the module docstring).

    ``layer_cosines`` maps each shared layer to its T x T cosine matrix. ``weak_conflict``,
    ``strong_conflict`` and ``update_projections`` are None when the step does not determine
    them (no task weights, or modified gradients the method does not report).
    """

    cosines: np.ndarray
    layer_cosines: dict[str, np.ndarray] = field(default_factory=dict)
    conflicting_pairs: int = 0
    weak_conflict: bool | None = None
    strong_conflict: bool | None = None
    update_projections: np.ndarray | None = None

    @property
    def num_tasks(self) -> int:
        return self.cosines.shape[0]


def pair_indices(num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs i < j in a fixed order (row-major upper triangle).

    >>> [(int(i), int(j)) for i, j in zip(*pair_indices(3))]
    [(0, 1), (0, 2), (1, 2)]
    """
    return np.triu_indices(num_tasks, k=1)


def step_conflicts(record: StepRecord, scales_task_gradients: bool = False,
                   tolerance: float = TOLERANCE) -> StepConflicts | None:
    """The diagnostics of the step ``record`` describes; None when it has no task Gramian.

    ``scales_task_gradients``: the method's property of that name (``Method``); it lets the
    modified gradients be c_i g_i when the method reports no ``projection_coefficients``.
    A step of CAGrad-Fast's subsampled combinations has the Gramian of combined losses, not of
    the tasks: None as well.

    Two tasks whose gradients g_1 = (1, 0) and g_2 = (-1, 1) conflict (cosine -1/sqrt(2));
    GradOPS's update D = (0.5, 1.5) conflicts with neither (docs/methods.md#gradops):

    >>> import torch
    >>> import deconflict
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> losses = [w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([-1.0, 1.0])]
    >>> method = deconflict.GradOPS()
    >>> record = deconflict.backward(losses, [w], method)
    >>> w.grad
    tensor([0.5000, 1.5000])
    >>> conflicts = deconflict.step_conflicts(record, method.scales_task_gradients)
    >>> conflicts.cosines.round(4).tolist()
    [[1.0, -0.7071], [-0.7071, 1.0]]
    >>> conflicts.conflicting_pairs, conflicts.weak_conflict, conflicts.strong_conflict
    (1, False, False)
    >>> conflicts.update_projections.round(4).tolist()   # g_i . D / ||g_i||
    [0.5, 0.7071]
    """
    if record.gramian is None or record.combinations is not None:
        return None
    M = record.gramian.numpy()
    norms = task_norms(M)
    cosines = cosine_matrix(M, norms)
    rows, cols = pair_indices(len(M))
    conflicting = int((M[rows, cols] < -tolerance * norms[rows] * norms[cols]).sum())
    layer_cosines = {layer: cosine_matrix(G.numpy()) for layer, G in
                     record.layer_gramians.items()}

    weak = projections = None
    if record.update_products is not None and record.update_sq_norm is not None:
        products = record.update_products.numpy()
        update_norm = math.sqrt(max(record.update_sq_norm, 0.0))
        weak = bool(np.any(products < -tolerance * norms * update_norm))
        projections = np.divide(products, norms, out=np.zeros_like(products),
                                where=norms > 0)

    strong = None
    C = modified_gradient_coefficients(record, scales_task_gradients)
    if C is not None:
        modified = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", C, M, C), 0.0))
        strong = bool(np.any(C @ M < -tolerance * np.outer(modified, norms)))
    return StepConflicts(cosines, layer_cosines, conflicting, weak, strong, projections)


def modified_gradient_coefficients(record: StepRecord,
                                   scales_task_gradients: bool) -> np.ndarray | None:
    """C (T x T) with g'_i = J^T C_i, or None when the method does not determine it.

    For a method that only scales the task gradients, g'_i = c_i g_i and C = diag(c):

    >>> import torch
    >>> import deconflict
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> losses = [w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([0.0, 2.0])]
    >>> record = deconflict.backward(losses, [w], "mean", compute_gramian=True)
    >>> modified_gradient_coefficients(record, scales_task_gradients=True).tolist()
    [[0.5, 0.0], [0.0, 0.5]]
    """
    reported = record.diagnostics.get("projection_coefficients")
    if reported is not None and reported.ndim == 2:
        return reported.numpy()
    if scales_task_gradients and record.weights is not None:
        return np.diag(record.weights.numpy())
    return None
