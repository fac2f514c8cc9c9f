"""Aligned-MTL-UB: Aligned-MTL on the gradients with respect to the shared representation
(Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023, the
upper-bound variant of the authors' code, "amtlub"; ``docs/methods.md#aligned_mtl_ub``,
``docs/methods.md#representation-mode``).

As MGDA-UB is to MGDA: the T x T Gramian is that of the per-task gradients with respect to the
shared features Z (T cheap backward passes through the heads), the alignment B of
``aligned_mtl.balance_transformation`` (B = sqrt(sigma) V_r Lambda_r^-1/2 V_r^T, the paper's
Eq. 10-11 in Gramian form) and the preference w give the weights c = B w, and the combination
sum_i c_i grad_Z L_i is backpropagated once through the encoder. The aligned gradients are
orthogonal with equal norms with respect to Z, not to the encoder's parameters. Use it with
``deconflict.backward(..., features=z)``; Z's Gramian sums over the batch and feature
dimensions, as the authors' code flattens the representation gradients. Options and defaults as
Aligned-MTL's (scale_mode "min", the authors' default for both variants).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from .aligned_mtl import AlignedMTL
from .registry import register


@register
class AlignedMTLUB(AlignedMTL):
    """Aligned-MTL-UB: needs ``features=`` in ``deconflict.backward``. Options as Aligned-MTL.

    The weights from a Gramian (in training, that of the features' gradients):

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.get("aligned_mtl_ub").weights(J @ J.T)
    tensor([1.0415, 0.9468], dtype=torch.float64)
    """

    name = "aligned_mtl_ub"
    summary = "Aligned-MTL on the shared representation's gradients, one encoder backward pass"
    needs_features = True

    def __init__(
        self, scale_mode: Literal["min", "median", "rmse"] = "min",
        pref_vector: Sequence[float] | None = None, rtol: float | None = None,
    ) -> None:
        super().__init__(scale_mode=scale_mode, pref_vector=pref_vector, rtol=rtol)
