"""RLW: random loss weighting (Lin et al., TMLR 2022; ``docs/methods.md#rlw``).

At every step, lambda = softmax(xi) with xi ~ N(0, I_T) drawn afresh: the weights sum to 1 (so
the scale is 1/T of a sum). This is the default of LibMTL, nash-mtl and TorchJD's ``Random``;
with ``seed=None`` the draw comes from PyTorch's global generator exactly as TorchJD's does
(float64), so a shared seed gives identical weights.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Context, Diagnostics, LossWeighting, SeededRandomness
from .options import Option
from .registry import register


@register
class RLW(SeededRandomness, LossWeighting):
    """Random loss weighting; see the module docstring. Option: ``seed``.

    softmax of a standard normal draw from the seeded generator:

    >>> import deconflict
    >>> deconflict.RLW(seed=0).weights(losses=[1.0, 2.0])
    tensor([0.8623, 0.1377], dtype=torch.float64)
    """

    name = "rlw"
    summary = "Random weights softmax(N(0, I)) drawn afresh at every step"
    paper = ("Lin et al., Reasonable Effectiveness of Random Weighting: A Litmus Test for "
             "Multi-Task Learning, TMLR 2022")

    OPTIONS = (
        Option("seed", "int", None, "a private random generator seeded with it (saved in the "
               "state); none: PyTorch's global RNG", nullable=True),
    )

    seed: int | None

    STATE = (SeededRandomness.GENERATOR_STATE,)

    def __init__(self, seed: int | None = None) -> None:
        self._set_options(seed=seed)

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        draw = torch.randn(context.num_tasks, generator=self._generator, dtype=torch.float64)
        return torch.softmax(draw, dim=0).numpy(), {}
