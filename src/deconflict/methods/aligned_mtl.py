"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023; ``docs/methods.md#aligned_mtl``).

Make the task gradients orthogonal with equal norms, then combine them. With M = V Lambda V^T,
keeping the r eigenvalues above ``rtol`` * lambda_max:

    B = sqrt(sigma) V_r Lambda_r^-1/2 V_r^T,   D = J^T B w,

so the aligned gradients B J (the paper's sigma_min U V^T from the SVD of J) are mutually
orthogonal with norm sqrt(sigma) when M has full rank. sigma is the smallest kept eigenvalue
("min", default), the median ("median": the lower of the two middle ones, as torch.median) or
the mean ("rmse"). w is the preference vector: ones by default (official code and LibMTL; TorchJD
uses 1/T). The official tolerance is rtol = T * float32 eps whatever the dtype (TorchJD uses the
Gramian's own dtype); both are offered through ``rtol``. If every eigenvalue is dropped (M = 0),
B = I (as TorchJD), so D = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from ._zero_update import note_zero_update
from .base import Context, Diagnostics, GramianWeighting
from .options import Option
from .registry import register
from .upgrad import preference_weights

_FLOAT32_EPS = float(np.finfo(np.float32).eps)


def balance_transformation(M: np.ndarray, scale_mode: str, rtol: float) -> np.ndarray:
    """B such that the rows of B J are orthogonal with equal norms (on the range of M)."""
    values, vectors = np.linalg.eigh(M)
    keep = values > rtol * max(float(values[-1]), 0.0)
    if not keep.any():
        return np.eye(M.shape[0])
    kept = values[keep]
    V = vectors[:, keep]
    if scale_mode == "min":
        sigma = float(kept.min())
    elif scale_mode == "median":
        sigma = float(np.sort(kept)[(kept.size - 1) // 2])
    else:
        sigma = float(kept.mean())
    return np.sqrt(sigma) * (V / np.sqrt(kept)) @ V.T


@register
class AlignedMTL(GramianWeighting):
    """Aligned-MTL (CVPR 2023); see the module docstring.

    Options: ``scale_mode`` in {"min", "median", "rmse"}, ``pref_vector`` (default ones),
    ``rtol`` (default T * float32 eps). Diagnostics: ``balance`` (the matrix B),
    ``zero_update``: None, or "stationary" (zero at a strongly Pareto-stationary J) or
    "cancelled" (B w = 0 elsewhere; a ``ZeroUpdateWarning`` once per instance).

    The sum of the aligned (orthogonal, equal-norm) gradients:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.AlignedMTL())
    tensor([0.5681, 0.9468])
    """

    name = "aligned_mtl"
    summary = "Align the task gradients to orthogonal, equal-norm ones, then sum them"
    paper = ("Senushkin et al., Independent Component Alignment for Multi-Task Learning, "
             "CVPR 2023")
    family = "multi-objective"

    @property
    def scales_task_gradients(self) -> bool:
        return False  # the update is built from modified gradients, not reported per task

    OPTIONS = (
        Option("scale_mode", "str", "min", "the common norm of the aligned gradients: from the "
               "smallest kept eigenvalue, the median one or their mean",
               choices=("min", "median", "rmse")),
        Option("pref_vector", "float", None, "non-negative task preferences w (none: ones)",
               low=0.0, nullable=True, shape="list"),
        Option("rtol", "float", None, "eigenvalues below rtol * lambda_max are dropped (none: "
               "T * float32 eps, the official tolerance)", low=0.0, high=1.0, nullable=True),
    )

    scale_mode: str
    pref_vector: tuple[float, ...] | None
    rtol: float | None

    def __init__(
        self, scale_mode: Literal["min", "median", "rmse"] = "min",
        pref_vector: Sequence[float] | None = None, rtol: float | None = None,
    ) -> None:
        self._set_options(scale_mode=scale_mode, pref_vector=pref_vector, rtol=rtol)

    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        T = M.shape[0]
        rtol = T * _FLOAT32_EPS if self.rtol is None else self.rtol
        B = balance_transformation(M, self.scale_mode, rtol)
        w = np.ones(T) if self.pref_vector is None else preference_weights(
            self.name, self.pref_vector, T)
        c = B @ w
        diagnostics: Diagnostics = {"balance": B}
        # B w = 0 when w is orthogonal to every kept eigenvector, which a large pair of
        # opposite gradients with a small remainder below rtol achieves at a non-stationary J.
        note_zero_update(self, M, c, diagnostics, "cancelled",
                         "the preference vector is orthogonal to every eigenvector of the "
                         "Gramian above rtol, so the aligned gradients cancel")
        return c, diagnostics
