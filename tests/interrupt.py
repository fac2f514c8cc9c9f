"""A process killed right after a checkpoint, for the checkpoint-and-resume tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class KilledError(Exception):
    """Stands for the process dying right after a checkpoint was written."""


def save_then_die(real_save: Callable[[Any, Any], None], stop_after: int, saves: list[int]
                  ) -> Callable[[Any, Any], None]:
    """A stand-in for ``save_torch``: writes the checkpoint, records its step in ``saves``,
    and raises ``KilledError`` once ``stop_after`` checkpoints were written."""

    def save(path: Any, state: Any) -> None:
        real_save(path, state)
        saves.append(state["step"])
        if len(saves) == stop_after:
            raise KilledError

    return save
