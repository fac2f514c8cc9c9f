"""IMTL-L: the loss part of impartial multi-task learning (Liu et al., ICLR 2021;
``docs/methods.md#imtl_l``).

Each loss L_t is replaced by exp(s_t) L_t - s_t with a learnable scale s_t (initialized at 0),
whose optimum makes exp(s_t) L_t = 1: every scaled loss is driven to the same value. The model's
gradient is that of sum_t c_t L_t with c_t = exp(s_t); s takes an Adam step with the closed-form
gradient exp(s_t) L_t - 1. (LibMTL's ``IMTL`` always combines this with IMTL-G on the gradients of
the scaled losses; here it is the loss part alone.) Options: ``lr`` = 0.025, ``init`` = 0.
"""

from __future__ import annotations

import numpy as np

from ._task_parameters import LearnedWeighting
from .registry import register


@register
class IMTLL(LearnedWeighting):
    """IMTL-L; see the module docstring. Needs ``losses``. Diagnostics: ``s`` (before update).

    Weights exp(s), then one Adam step on s (the first scaled loss
    exp(s) L is already 1):

    >>> import deconflict
    >>> imtl = deconflict.IMTLL()
    >>> imtl.weights(losses=[1.0, 2.0])
    tensor([1., 1.], dtype=torch.float64)
    >>> imtl.weights(losses=[1.0, 2.0])
    tensor([1.0000, 0.9753], dtype=torch.float64)
    """

    name = "imtl_l"
    summary = "Learned loss scales exp(s_t) that drive every scaled loss to the same value"
    paper = "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021"

    def _weights_from(self, s: np.ndarray) -> np.ndarray:
        return np.exp(s)

    def _gradient(self, s: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return np.exp(s) * losses - 1.0
