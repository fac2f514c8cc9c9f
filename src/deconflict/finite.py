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
from torch._utils import _flatten_dense_tensors

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


_WIDE = (torch.float32, torch.float64)
# Gradients up to this many elements (the task heads, biases) are summed together, one
# concatenation per device and dtype: a reduction costs a few microseconds of dispatch whatever
# its size, and a model with many tasks has many small heads.
_SMALL = 1 << 14


def first_non_finite(grads: Sequence[Tensor | None]) -> int | None:
    """The index of the first gradient holding NaN or infinity, or None (one read of each).

    A sum is non-finite whenever an element is (NaN and infinity propagate) and costs one
    memory-bound pass with no temporary; only if one is, the exact test (the smallest and
    largest element, also one pass and no temporary: both are finite exactly when every
    element is) rules out an overflow of the sum of finite elements. Sums are taken in at least
    float32 (a float16 sum of finite values overflows past 65504), the small gradients' over
    their concatenation, and stacked per device, so that the check synchronizes once. (Other
    single reads measured no faster on a 20 MB trunk: a dot product, ``torch._foreach_norm``,
    min and max; nor did summing each gradient inside the backward pass, by hooks, while it was
    just written. Reading memory is the cost, see ``docs/performance.md``.)

    >>> import torch
    >>> first_non_finite([torch.ones(3), None, torch.tensor([1.0, float("nan")])])
    2
    >>> first_non_finite([torch.full((2,), 3e38), torch.zeros(1)]) is None  # the sum overflows
    True
    >>> first_non_finite([torch.full((8,), 6e4, dtype=torch.float16)]) is None
    True
    """
    sums: list[Tensor] = []
    small: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for grad in grads:
        if grad is not None:
            if grad.numel() > _SMALL:
                sums.append(_wide_sum(grad))
            else:
                small.setdefault((grad.device, grad.dtype), []).append(grad)
    # One C++ call flattens and concatenates a group (a reshape per tensor from Python costs
    # as much as the sum it saves).
    sums += [_wide_sum(_flatten_dense_tensors(group)) for group in small.values()]
    by_device: dict[torch.device, list[Tensor]] = {}
    for total in sums:
        by_device.setdefault(total.device, []).append(total)
    if all(bool(torch.isfinite(torch.stack(totals)).all()) for totals in by_device.values()):
        return None
    for k, grad in enumerate(grads):
        if grad is not None and not _all_finite(grad):
            return k
    return None


def _wide_sum(grad: Tensor) -> Tensor:
    """The sum of a gradient in at least float32 (a complex one: of its real and imaginary
    parts)."""
    if grad.is_complex():
        return torch.view_as_real(grad).sum()
    if grad.dtype in _WIDE:
        return grad.sum()
    return grad.sum(dtype=torch.promote_types(grad.dtype, torch.float32))


def _all_finite(grad: Tensor) -> bool:
    """The exact test: the extremes are finite exactly when every element is (NaN propagates
    through min and max, and an infinity is an extreme)."""
    if grad.numel() == 0:
        return True
    if grad.is_complex():
        grad = torch.view_as_real(grad)
    low, high = torch.aminmax(grad)
    return bool(torch.isfinite(low) & torch.isfinite(high))
