"""Loss scaling as one value: what a ``torch.amp.GradScaler`` means for a deconflict step.

With a scale s (a power of two, as a GradScaler's is), the rows differentiated are s L_i, so that
float16 gradients keep their small values; everything the method sees is unscaled and exact:

- the Gramian: M = (s^2 M) / s^2 (``gramian``), the Gramian of the gradients of the L_i;
- a Jacobian method's blocks: J = (s J) / s (``unscaled``), its update written as s D
  (``scaled``);
- the update of a Gramian method, s J^T c, is the product of the scaled blocks with the same
  weights c: nothing to undo, ``scaler.step`` divides ``.grad`` by s;
- a non-finite loss or gradient is then an overflow, not an error: ``skips_overflow`` tells the
  engine to skip the step (``.grad`` filled with infinity, so that ``scaler.step`` skips the
  optimizer and ``scaler.update`` lowers the scale), and the record says ``skipped``.

``LossScale.of(None)`` (or of a disabled scaler) is the identity: s = 1, and a non-finite value
is an error (``docs/methods.md#non-finite``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class LossScale:
    """The scale s of the step's losses, and the scaler it comes from (None: no scaling).

    >>> import torch
    >>> scale = LossScale.of(torch.amp.GradScaler("cpu", init_scale=4.0))
    >>> scale.factor, scale.skips_overflow
    (4.0, True)
    >>> scale.gramian(torch.tensor([[32.0]]))
    tensor([[2.]])
    >>> LossScale.of(None).factor
    1.0
    """

    factor: float = 1.0
    scaler: Any = None

    @classmethod
    def of(cls, scaler: Any) -> LossScale:
        """The scale of ``scaler`` (a ``torch.amp.GradScaler``), or none if it is disabled."""
        if scaler is None or not scaler.is_enabled():
            return cls()
        # The scale scaler.scale(loss) will multiply by: get_scale() reads the initial scale
        # before the scaler created its tensor, which scale() then creates with that value.
        return cls(float(scaler.get_scale()), scaler)

    @property
    def skips_overflow(self) -> bool:
        """Whether a non-finite loss or gradient skips the step (True) or raises (False)."""
        return self.scaler is not None

    def losses(self, losses: Sequence[Tensor]) -> list[Tensor]:
        """What ``scaler.scale(loss).backward()`` would differentiate: s L_i.

        ``scaler.scale`` also creates the scale tensor that ``scaler.update()`` adjusts.
        """
        if self.scaler is None:
            return list(losses)
        return [self.scaler.scale(loss) for loss in losses]

    def gramian(self, M: Tensor) -> Tensor:
        """The Gramian of the unscaled gradients from that of the scaled ones (exact)."""
        return M if self.factor == 1.0 else M / self.factor**2

    def unscaled(self, block: Tensor) -> Tensor:
        """A block of scaled gradients, unscaled (exact for a power of two)."""
        return block if self.factor == 1.0 else block / self.factor

    def scaled(self, update: Tensor) -> Tensor:
        """An unscaled update as ``.grad`` must receive it, for ``scaler.step`` to unscale."""
        return update if self.factor == 1.0 else update * self.factor


NO_SCALE = LossScale()
