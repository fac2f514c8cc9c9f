"""GradDrop: gradient sign dropout (Chen et al., "Just Pick a Sign", NeurIPS 2020;
``docs/methods.md#graddrop``).

Per coordinate, keep only the gradients of one sign, chosen at random with the probability that
the signs agree. With G_i the sign statistic of task i:

    P = (1 + sum_i G_i / (sum_i |G_i| + eps)) / 2      (positive sign purity)
    U ~ Uniform(0, 1), one per coordinate
    mask_i = [P > U] [G_i > 0] + [P < U] [G_i < 0]
    update = sum_i (leak_i + (1 - leak_i) mask_i) * grad_i

Two levels, chosen by the engine's mode:

- parameter level (``deconflict.backward`` without features, or ``aggregate``): G_i = g_i, the
  task's gradient on the shared parameters (CAGrad repository, TorchJD);
- activation level (``features=z``, the paper's and LibMTL's form): the per-task gradients
  with respect to Z (batch first) give G_i = sum over the batch of sign(Z) * dL_i/dZ, one U per
  feature, and the mask is broadcast over the batch; the masked sum is backpropagated through
  the trunk. ``sign_correction=False`` drops the sign(Z) factor.

Not Gramian-based: it needs the task gradients themselves (a ``JacobianAggregator``). Options:
``leak`` (a number or one per task, in [0, 1], default 0), ``seed``, ``eps`` (default 0, like
TorchJD: coordinates where every G_i is 0 get no mask whatever P is, so no epsilon is needed;
LibMTL's absolute 1e-7 makes P depend on the gradients' scale - at 1e-21 it would drop a single
task's gradient half of the time).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ShapeError
from .base import Diagnostics, JacobianAggregator, SeededRandomness
from .options import Option
from .registry import register


@register
class GradDrop(SeededRandomness, JacobianAggregator):
    """GradDrop (NeurIPS 2020); see the module docstring.

    Diagnostics: ``kept_fraction`` (the fraction of (task, coordinate) gradient entries kept).

    Per coordinate, the kept sign is drawn from the seeded generator:

    >>> import torch, deconflict
    >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])  # two conflicting task gradients
    >>> deconflict.aggregate(J, deconflict.GradDrop(seed=0))
    tensor([1., 1.])
    """

    name = "graddrop"
    summary = "Per coordinate, randomly keep one gradient sign with the agreeing probability"
    paper = ("Chen et al., Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign "
             "Dropout, NeurIPS 2020")
    family = "projection"

    OPTIONS = (
        Option("leak", "float", 0.0, "the fraction of each task's gradient always kept (one "
               "for all tasks or one per task)", low=0.0, high=1.0, shape="scalar_or_list"),
        Option("eps", "float", 0.0, "eps in the sign purity's denominator", low=0.0),
        Option("sign_correction", "bool", True, "multiply the inputs by sign(Z) (paper); false "
               "drops that factor"),
        Option("seed", "int", None, "a private random generator seeded with it (saved in the "
               "state); none: PyTorch's global RNG", nullable=True),
    )

    leak: float | tuple[float, ...]
    eps: float
    sign_correction: bool
    seed: int | None

    STATE = (SeededRandomness.GENERATOR_STATE,)

    def __init__(
        self, leak: float | Sequence[float] = 0.0, eps: float = 0.0, sign_correction: bool = True,
        seed: int | None = None,
    ) -> None:
        self._set_options(leak=leak, eps=eps, sign_correction=sign_correction, seed=seed)

    def _leaks(self, T: int, like: Tensor) -> Tensor:
        if isinstance(self.leak, tuple):
            if len(self.leak) != T:
                raise ShapeError(f"{self.name}: {len(self.leak)} leaks for {T} tasks")
            values = self.leak
        else:
            values = (self.leak,) * T
        return torch.tensor(values, dtype=like.dtype, device=like.device)

    def _uniform(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        draw = torch.rand(shape, generator=self._generator, dtype=like.dtype)
        return draw.to(like.device)

    def combine_jacobian(
        self, blocks: Sequence[Tensor], *, losses: np.ndarray | None,
        features: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], Diagnostics]:
        updates, kept, total = [], 0.0, 0
        for index, block in enumerate(blocks):
            T = block.shape[0]
            leak = self._leaks(T, block)
            if features is None:
                grads, statistic = block, block
            else:
                z = features[index]
                grads = block.reshape(T, z.shape[0], -1)
                signed = grads * torch.sign(z.reshape(1, z.shape[0], -1)) \
                    if self.sign_correction else grads
                statistic = signed.sum(dim=1)
            # Where every G_i is 0 no mask can be set, so P's value there does not matter.
            magnitude = statistic.abs().sum(dim=0) + self.eps
            purity = 0.5 * (1.0 + statistic.sum(dim=0)
                            / torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude)))
            uniform = self._uniform(tuple(purity.shape), block)
            mask = ((purity > uniform) & (statistic > 0)) | ((purity < uniform) & (statistic < 0))
            scale = leak[:, None] + (1.0 - leak[:, None]) * mask.to(block.dtype)
            if features is not None:
                scale = scale[:, None, :]
            updates.append((scale * grads).sum(dim=0).reshape(-1))
            kept += float(mask.sum())
            total += mask.numel()
        return updates, {"kept_fraction": kept / max(total, 1)}
