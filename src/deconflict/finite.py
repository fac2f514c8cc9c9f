"""Finiteness checks of gradients, and what they find (``docs/methods.md#non-finite``).

A check returns a ``NonFinite`` finding instead of raising: the engine decides what it means. A
finding is an error (``NonFiniteGradientError``) in a plain step, and a skipped step under loss
scaling, where a non-finite gradient is the overflow a GradScaler expects now and then
(``scaling.LossScale``). Nothing is raised to be caught again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import NonFiniteError, NonFiniteGradientError


@dataclass(frozen=True)
class NonFinite:
    """A NaN or an infinity was found: ``message`` names the task and the parameter (or the
    loss, when ``gradient`` is False: the loss value itself is not finite).

    >>> NonFinite("the gradient of loss 1 contains NaN").error()
    NonFiniteGradientError('the gradient of loss 1 contains NaN')
    >>> NonFinite("loss 0 is inf", gradient=False).error()
    NonFiniteError('loss 0 is inf')
    """

    message: str
    gradient: bool = True

    def error(self) -> NonFiniteError:
        """The exception to raise when the finding is an error (no loss scaling)."""
        if self.gradient:
            return NonFiniteGradientError(self.message)
        return NonFiniteError(self.message)


def first_non_finite(grads: Sequence[Tensor | None]) -> int | None:
    """The index of the first gradient holding NaN or infinity, or None (one read of each).

    A sum is non-finite whenever an element is (NaN and infinity propagate) and costs one
    memory-bound pass; only if one is, the exact test rules out an overflow of the sum of finite
    elements. The sums are stacked so that the whole check synchronizes once. (Taking the sums
    in the backward pass, by hooks, while each gradient was just written, measured no faster:
    a trunk's gradients outgrow the caches, and the read is bound by memory either way.)

    >>> import torch
    >>> first_non_finite([torch.ones(3), None, torch.tensor([1.0, float("nan")])])
    2
    >>> first_non_finite([torch.full((2,), 3e38), torch.zeros(1)]) is None  # the sum overflows
    True
    """
    present = [(k, g) for k, g in enumerate(grads) if g is not None]
    if not present:
        return None
    totals = torch.stack([g.sum() for _, g in present])
    if bool(torch.isfinite(totals).all()):
        return None
    for k, grad in present:
        if not bool(torch.isfinite(grad).all()):
            return k
    return None
