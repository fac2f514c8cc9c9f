"""The model interface every supervised problem trains: shared parameters, one output per task.

Its own module (not ``problems.base``) so that the architectures (``models``, ``segnet``) and the
problems that build them import it without importing each other.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..recon import BranchedModule


class MultiTaskModel(nn.Module):
    """A model with shared parameters (``shared``) and one output per task.

    ``forward`` returns the shared representation and a dict of task outputs; the
    representation is what representation mode (``features=``) differentiates.
    """

    shared: nn.Module
    # Whether ``shared`` is one trunk module called once whose layers ``recon.branch`` may
    # split; such a model's forward must accept the per-task streams (``task_streams``).
    supports_branching: bool = False

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def shared_parameters(self) -> list[tuple[str, Tensor]]:
        """The parameters every task shares (without the branched copies after Recon)."""
        if isinstance(self.shared, BranchedModule):
            return list(self.shared.shared_parameters())
        return list(self.shared.named_parameters())

    def task_streams(self, z: Any, count: int) -> list[Any]:
        """The trunk's output for each of ``count`` tasks: its per-task streams once Recon
        branched it, else the one shared representation ``count`` times."""
        return list(z) if isinstance(self.shared, BranchedModule) else [z] * count
