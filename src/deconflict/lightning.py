"""deconflict in a Lightning ``LightningModule``, with manual optimization.

A multi-task method cannot run under Lightning's automatic optimization: that loop backpropagates
the one loss ``training_step`` returns, while ``deconflict.backward`` needs the T task losses
separately. So the module turns automatic optimization off and does each step itself, and this
adapter keeps that step to one line and makes the method part of the Lightning run:

- ``deconflict_step`` does zero_grad, ``deconflict.backward`` (in place of
  ``self.manual_backward``), the optimizer step, FAMO's ``after_step``, and logs the task
  weights and the number of conflicting task pairs through ``module.log_dict``;
- ``end_epoch`` tells the method an epoch ended (DWA's epoch averages);
- ``save_method_state`` / ``load_method_state`` store the method's ``state_dict()`` in a
  Lightning checkpoint under ``"deconflict_method"``, so that a resumed run (``trainer.fit(...,
  ckpt_path=...)``) continues the method exactly, not from a fresh state;
- ``DeconflictMixin`` wires the last two into Lightning's hooks for a module whose method is in
  ``self.mtl_method``::

      class Net(DeconflictMixin, L.LightningModule):   # the mixin first, so its hooks run
          def __init__(self):
              super().__init__()
              self.automatic_optimization = False
              self.mtl_method = deconflict.get("gradops", alpha=-1)
              self.trunk, self.heads = ..., ...

          def training_step(self, batch, batch_idx):
              losses = self.task_losses(batch)
              self.deconflict_step(losses, self.trunk,
                                   losses_after_step=lambda: self.task_losses(batch))

  ``losses_after_step`` is only called for the methods that need it (FAMO), so any method can be
  swapped in by name. examples/lightning_mtl.py is a complete, runnable module.

What ``self.manual_backward`` does and this step does not:

- Mixed precision. Every precision works. With ``precision="16-mixed"`` Lightning scales the
  loss in ``manual_backward`` and unscales in ``optimizer.step()``: ``deconflict_step`` passes
  the precision plugin's GradScaler to ``deconflict.backward(scaler=...)``, which scales the task
  losses the same way (and skips the step on overflow, as the scaler does; FAMO's ``after_step``
  is then not called). ``"bf16-mixed"`` needs no scaling. Either way deconflict accumulates the
  Gramian in float64.
- The ``on_before_backward`` / ``on_after_backward`` hooks and the module's ``backward`` hook are
  not called: no single loss is backpropagated. ``on_before_optimizer_step`` is called (by the
  optimizer step) and is the place to inspect or clip the gradients, e.g. with
  ``self.clip_gradients(optimizer, gradient_clip_val=1.0)``; Lightning rejects
  ``Trainer(gradient_clip_val=...)`` under manual optimization anyway.
- Distributed strategies (DDP, FSDP, DeepSpeed) are not supported: each process would weight its
  own gradients, and the shared parameters' gradients, written outside autograd's accumulation,
  would not be synchronized. ``deconflict_step`` refuses ``world_size > 1``.

As always under manual optimization, learning-rate schedulers are stepped by the module
(``self.lr_schedulers().step()``).

This module needs the ``lightning`` package (``pip install 'deconflict[lightning]'``);
``import deconflict`` does not import it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.core.optimizer import LightningOptimizer
except ImportError as error:
    raise ImportError(
        "deconflict.lightning needs Lightning: pip install 'deconflict[lightning]'"
    ) from error

from .engine import backward
from .errors import InvalidOptionError
from .methods.base import AfterStep, EpochEnd, Method
from .record import StepRecord
from .resolve import resolve_method

__all__ = [
    "CHECKPOINT_KEY",
    "DeconflictMixin",
    "deconflict_step",
    "end_epoch",
    "load_method_state",
    "save_method_state",
]

CHECKPOINT_KEY = "deconflict_method"
# Marks a NumPy array stored as a tensor in a checkpoint (see ``_encode``).
_NDARRAY = "__deconflict_ndarray__"

LossesAfterStep = Callable[[], Sequence[Tensor] | Tensor]


def deconflict_step(
    module: pl.LightningModule,
    losses: Sequence[Tensor] | Tensor,
    shared: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    method: Method | str,
    *,
    losses_after_step: LossesAfterStep | None = None,
    optimizer: LightningOptimizer | None = None,
    log: bool = True,
    task_names: Sequence[str] | None = None,
    **backward_options: Any,
) -> StepRecord:
    """One manual optimization step of ``module`` with ``method``; call it in ``training_step``.

    Zeroes the gradients, writes the method's update with ``deconflict.backward`` (the shared
    parameters get J^T c, the heads their ordinary gradients), steps the optimizer, gives FAMO
    the losses after the step, and logs the step.

    Args:
        module: the LightningModule being trained, with ``automatic_optimization = False``.
        losses: the T task losses (scalars).
        shared: the parameters all tasks share (a module, tensors or named tensors).
        method: a deconflict method instance (the same one every step), or the name of a
            stateless one.
        losses_after_step: computes the T losses again on the same batch; called without
            gradients after the optimizer step, and only when the method needs them (an
            ``AfterStep`` method: FAMO).
        optimizer: the optimizer to step, one of ``module.optimizers()`` (a bare torch
            optimizer would bypass the trainer's step counting, hence ``max_steps``); None:
            ``module.optimizers()``, which must then be a single optimizer.
        log: log ``deconflict/weight_<task>`` (when the update is J^T c) and
            ``deconflict/conflicting_pairs`` (when the Gramian was computed) for this step.
        task_names: names for the logged weights; None numbers the tasks from 0.
        **backward_options: passed to ``deconflict.backward`` (``mode``, ``features``,
            ``head_weights``, ``compute_gramian``, ...).

    Returns:
        The ``StepRecord`` of ``deconflict.backward``.

    Raises:
        InvalidOptionError: automatic optimization is on, the run is distributed, several
            optimizers and none chosen, or the method needs ``losses_after_step`` and it was not
            given. Checked before anything is written.
    """
    resolved = resolve_method(method)
    _check_trainer(module)
    if task_names is not None and len(task_names) != len(losses):
        raise InvalidOptionError(f"{len(task_names)} task_names for {len(losses)} losses")
    if isinstance(resolved, AfterStep) and losses_after_step is None:
        raise InvalidOptionError(
            f"{resolved.name} needs the losses after the optimizer step: pass "
            "losses_after_step=<a function computing the task losses again on the same batch>"
        )
    if optimizer is None:
        optimizers = module.optimizers()
        if isinstance(optimizers, list):
            raise InvalidOptionError(
                f"the module has {len(optimizers)} optimizers: pass optimizer= to choose one"
            )
        optimizer = optimizers
    scaler = getattr(module.trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        # 16-mixed: deconflict scales the losses with the plugin's GradScaler, as
        # manual_backward would; the plugin's optimizer step unscales, skips on overflow and
        # updates the scale.
        backward_options.setdefault("scaler", scaler)
    optimizer.zero_grad()
    record = backward(losses, shared, resolved, **backward_options)
    optimizer.step()
    if isinstance(resolved, AfterStep) and not record.skipped:
        assert losses_after_step is not None  # checked above
        with torch.no_grad():
            resolved.after_step(_stacked(losses_after_step()))
    metrics = _step_metrics(record, task_names) if log else {}
    if metrics:
        module.log_dict(metrics, on_step=True, on_epoch=False)
    return record


def end_epoch(method: Method) -> None:
    """Tell ``method`` that a training epoch ended if it is an ``EpochEnd`` method (DWA's epoch
    averages); others have nothing to do."""
    if isinstance(method, EpochEnd):
        method.end_epoch()


def save_method_state(method: Method, checkpoint: dict[str, Any],
                      key: str = CHECKPOINT_KEY) -> None:
    """Store ``method.state_dict()`` in a Lightning checkpoint dict (``on_save_checkpoint``).

    NumPy arrays in the state are stored as tensors, because Lightning loads checkpoints with
    ``torch.load``'s default ``weights_only=True``, which refuses NumPy arrays;
    ``load_method_state`` turns them back into arrays, so the restored state is identical.
    """
    checkpoint[key] = {"method": method.name, "state": _encode(method.state_dict())}


def load_method_state(method: Method, checkpoint: Mapping[str, Any],
                      key: str = CHECKPOINT_KEY) -> None:
    """Restore the state ``save_method_state`` stored (``on_load_checkpoint``).

    A checkpoint without the key (saved without deconflict) leaves the method as it is, with a
    warning when the method keeps state. A checkpoint of another method raises
    InvalidOptionError.
    """
    if key not in checkpoint:
        if method.stateful:
            warnings.warn(
                f"the checkpoint has no {key!r} entry: {method.name} starts from a fresh state",
                UserWarning, stacklevel=2,
            )
        return
    saved = checkpoint[key]
    if saved["method"] != method.name:
        raise InvalidOptionError(
            f"the checkpoint holds the state of {saved['method']}, not of {method.name}"
        )
    method.load_state_dict(_decode(saved["state"]))


class DeconflictMixin:
    """Lightning hooks for a LightningModule trained with the deconflict method ``mtl_method``.

    List it before ``LightningModule`` (``class Net(DeconflictMixin, L.LightningModule)``) and
    set ``self.mtl_method`` in ``__init__``. It adds ``self.deconflict_step(losses, shared,
    ...)`` (``deconflict_step`` with that method) and extends three hooks, each calling
    ``super()`` first, so a subclass that overrides them must call ``super()`` too:

    - ``on_train_epoch_end``: ``end_epoch(self.mtl_method)``;
    - ``on_save_checkpoint`` / ``on_load_checkpoint``: the method's state under
      ``"deconflict_method"``.
    """

    mtl_method: Method

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Listed after LightningModule, the mixin's hooks would be shadowed by Lightning's empty
        # ones and the method's state silently left out of checkpoints.
        mro = cls.__mro__
        if pl.LightningModule in mro and mro.index(pl.LightningModule) < mro.index(
                DeconflictMixin):
            raise TypeError(f"{cls.__name__}: list DeconflictMixin before LightningModule in the "
                            "base classes, so that its hooks run")

    def deconflict_step(
        self,
        losses: Sequence[Tensor] | Tensor,
        shared: nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
        **options: Any,
    ) -> StepRecord:
        """``deconflict_step(self, losses, shared, self.mtl_method, **options)``."""
        assert isinstance(self, pl.LightningModule), "DeconflictMixin is for LightningModules"
        return deconflict_step(self, losses, shared, self._deconflict_method(), **options)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # type: ignore[misc]
        end_epoch(self._deconflict_method())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        save_method_state(self._deconflict_method(), checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        load_method_state(self._deconflict_method(), checkpoint)

    def _deconflict_method(self) -> Method:
        method = getattr(self, "mtl_method", None)
        if not isinstance(method, Method):
            raise InvalidOptionError(
                f"{type(self).__name__}.mtl_method must be a deconflict method, got {method!r}: "
                "set self.mtl_method = deconflict.get(...) in __init__"
            )
        return method


# ------------------------------------------------------------------------------------ helpers
def _check_trainer(module: pl.LightningModule) -> None:
    if module.automatic_optimization:
        raise InvalidOptionError(
            "deconflict_step does the optimization step itself: set "
            "self.automatic_optimization = False in the module's __init__"
        )
    trainer = module.trainer
    if trainer.world_size > 1:
        raise InvalidOptionError(
            f"deconflict_step supports one device, not world_size={trainer.world_size}: each "
            "process would combine only its own task gradients"
        )


def _stacked(losses: Sequence[Tensor] | Tensor) -> Tensor:
    if isinstance(losses, Tensor):
        return losses.detach().reshape(-1)
    return torch.stack([torch.as_tensor(loss).detach().reshape(()) for loss in losses])


def _step_metrics(record: StepRecord, task_names: Sequence[str] | None) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if record.weights is not None:
        names = task_names if task_names is not None else range(len(record.weights))
        metrics.update({f"deconflict/weight_{name}": float(w)
                        for name, w in zip(names, record.weights.tolist(), strict=True)})
    if record.gramian is not None:
        metrics["deconflict/conflicting_pairs"] = float(len(record.conflicting_pairs))
    return metrics


def _encode(value: Any) -> Any:
    """``value`` with NumPy arrays as marked tensors and NumPy scalars as Python numbers."""
    # Only numeric dtypes have a tensor counterpart; anything else is left to torch.save.
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return {_NDARRAY: torch.from_numpy(value.copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_encode(item) for item in value)
    return value


def _decode(value: Any) -> Any:
    """The inverse of ``_encode``."""
    if isinstance(value, dict):
        if set(value) == {_NDARRAY}:
            return value[_NDARRAY].numpy().copy()
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_decode(item) for item in value)
    return value
