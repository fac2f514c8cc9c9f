"""MGDA-UB: MGDA on the gradients with respect to the shared representation (Sener & Koltun,
NeurIPS 2018, Section 3.3; ``docs/methods.md#mgda_ub``, ``docs/methods.md#representation-mode``).

The min-norm weights are computed from the Gramian of the per-task gradients with respect to the
shared features Z (an upper bound on the parameter problem, since
||sum_i alpha_i grad_theta L_i|| <= ||dZ/dtheta|| ||sum_i alpha_i grad_Z L_i||), and the combination
is backpropagated once through the encoder. Use it with ``deconflict.backward(..., features=z)``;
Z's Gramian sums over the batch and feature dimensions, like the official code (LibMTL first sums
the representation gradient over the batch, a different Gramian).

Default normalizer "loss+" (the official sample configuration for MGDA-UB); otherwise as MGDA.
"""

from __future__ import annotations

from typing import Literal

from .mgda import MGDA
from .options import with_defaults
from .registry import register


@register
class MGDAUB(MGDA):
    """MGDA-UB: needs ``features=`` in ``deconflict.backward``. Options as MGDA.

    The weights from a Gramian (in training, that of the features' gradients):

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.MGDAUB().weights(J @ J.T, losses=[1.0, 2.0])
    tensor([0.2790, 0.3224], dtype=torch.float64)
    """

    name = "mgda_ub"
    summary = "MGDA on the shared representation's gradients, one encoder backward pass"
    needs_features = True

    OPTIONS = with_defaults(MGDA.OPTIONS, normalizer="loss+")

    def __init__(
        self,
        normalizer: Literal["none", "l2", "loss", "loss+"] = "loss+",
        update_from: Literal["normalized", "raw"] = "normalized",
    ) -> None:
        super().__init__(normalizer=normalizer, update_from=update_from)
