"""What a method is: a rule from the Gramian M = J J^T (and context) to task weights c.

The update on the shared parameters is D = J^T c. A method never sees the d-dimensional
gradients unless it must (none of the methods in this module's siblings do): the engine builds M,
asks for c, and writes J^T c. Context a method may use:

- ``losses``: the T loss values (the tensioner, MGDA's loss normalizers);
- ``combinations``: for methods that request gradients of combinations of the losses
  (CAGrad-Fast's task subsampling), the R x T matrix A whose rows were differentiated; M is then
  the R x R Gramian of A J and the returned weights are still over the T tasks.

State. Stateful methods keep their state in one attribute, ``state``, updated by a pure step
function of the method's module (``new_state = f(old_state, ...)``); ``state_dict()`` and
``load_state_dict()`` save and restore it exactly, so a resumed run follows the same trajectory.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidOptionError, NonFiniteError, ShapeError
from ..gramian import combine, gramian, rounding_floor, vector_norm
from ..linalg import as_gramian_array, to_numpy

Diagnostics = dict[str, Any]


@dataclass(frozen=True)
class Context:
    """What a method may know besides the Gramian, validated against the number of tasks."""

    num_tasks: int
    losses: np.ndarray | None = None
    combinations: np.ndarray | None = None


class Method(ABC):
    """Base class: subclasses implement ``_compute(M, context) -> (weights, diagnostics)``.

    Class attributes describe the method for users and for the engine:

    - ``name``: the registry name (lower snake case); ``summary``: one line; ``paper``: citation;
    - ``family``: "scalarization", "projection", "multi-objective" or "loss weighting";
    - ``needs_gramian``: False when the weights do not depend on the gradients, so the engine
      can do one ordinary backward pass of sum_i c_i L_i instead of T;
    - ``stateful``: True when weights depend on earlier calls (then see ``state_dict``).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    family: ClassVar[str]
    needs_gramian: ClassVar[bool] = True
    stateful: ClassVar[bool] = False

    @property
    def needs_losses(self) -> bool:
        """Whether ``weights`` requires the ``losses`` context."""
        return False

    # ----------------------------------------------------------------------------- public API
    def weights(self, gramian: Any = None, *, losses: Any = None, **context: Any) -> Tensor:
        """Task weights c (T,) float64 such that the update is J^T c."""
        c, _ = self._run(gramian, losses, context)
        return c

    def weights_with_diagnostics(
        self, gramian: Any = None, *, losses: Any = None, **context: Any
    ) -> tuple[Tensor, Diagnostics]:
        """Task weights and a dict of method-specific diagnostics (documented per method)."""
        c, diagnostics = self._run(gramian, losses, context)
        return c, _as_tensors(diagnostics)

    def _run(
        self, gramian: Any, losses: Any, context: dict[str, Any]
    ) -> tuple[Tensor, Diagnostics]:
        device = gramian.device if isinstance(gramian, Tensor) else torch.device("cpu")
        M = None if gramian is None else as_gramian_array(gramian)
        ctx = self._context(M, losses, context)
        if M is None and self.needs_gramian:
            raise ShapeError(f"{self.name} needs the Gramian of the task gradients")
        c, diagnostics = self._compute(M, ctx)
        c = np.asarray(c, dtype=np.float64)
        if c.shape != (ctx.num_tasks,):
            raise ShapeError(f"{self.name} returned {c.shape[0]} weights for {ctx.num_tasks} tasks")
        if not np.isfinite(c).all():
            raise NonFiniteError(f"{self.name} produced non-finite weights {c.tolist()}")
        return torch.from_numpy(c).to(device), diagnostics

    def aggregate(self, jacobian: Tensor, *, losses: Any = None, **context: Any) -> Tensor:
        """The update J^T c for a T x d Jacobian, accumulated in float64, in J's dtype.

        An update below the rounding floor of forming it (``gramian.rounding_floor``) is
        returned as exact zeros.
        """
        M = gramian(jacobian)
        c = self.weights(M, losses=losses, **context)
        update = combine(jacobian, c)
        if vector_norm([update]) <= rounding_floor(M, c):
            update.zero_()
        return update

    def gradient_combinations(self, num_tasks: int) -> np.ndarray | None:
        """Rows of losses to differentiate instead of the T tasks (None: the tasks themselves)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The method's state, to checkpoint (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by ``state_dict``."""
        if state:
            raise InvalidOptionError(f"{self.name} is stateless but got state {sorted(state)}")

    def reset(self) -> None:  # noqa: B027 - a no-op for stateless methods, on purpose
        """Forget all state (stateless methods: nothing to do)."""

    def options(self) -> dict[str, Any]:
        """The options this instance was built with (shown in its repr)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{type(self).__name__}({args})"

    # -------------------------------------------------------------------------- for subclasses
    @abstractmethod
    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        """Weights (T,) and diagnostics from a validated float64 Gramian."""

    def _context(self, M: np.ndarray | None, losses: Any, extra: dict[str, Any]) -> Context:
        combinations = extra.pop("combinations", None)
        if extra:
            raise InvalidOptionError(
                f"unknown context {sorted(extra)} for {self.name}: the context a method accepts "
                "is losses= and combinations="
            )
        if combinations is not None:
            combinations = to_numpy(combinations)
            if combinations.ndim != 2:
                raise ShapeError(f"combinations must be a matrix, got shape {combinations.shape}")
            num_tasks = combinations.shape[1]
            if M is not None and M.shape[0] != combinations.shape[0]:
                raise ShapeError(
                    f"a Gramian of {M.shape[0]} rows does not fit {combinations.shape[0]} "
                    "combinations"
                )
        elif M is not None:
            num_tasks = M.shape[0]
        elif losses is not None:
            num_tasks = len(to_numpy(losses).reshape(-1))
        else:
            raise ShapeError(f"{self.name} needs the Gramian or the losses to know the task count")
        values = None
        if losses is not None:
            values = to_numpy(losses)
            if values.shape != (num_tasks,):
                raise ShapeError(
                    f"got {values.size} losses of shape {values.shape} for {num_tasks} tasks"
                )
            if not np.isfinite(values).all():
                bad = [int(i) for i in np.flatnonzero(~np.isfinite(values))]
                raise NonFiniteError(f"loss values of tasks {bad} are NaN or infinite")
        elif self.needs_losses:
            raise InvalidOptionError(f"{self!r} needs the losses: pass losses=[L_1, ..., L_T]")
        return Context(num_tasks=num_tasks, losses=values, combinations=combinations)


def _as_tensors(diagnostics: Diagnostics) -> Diagnostics:
    return {
        key: torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value
        for key, value in diagnostics.items()
    }


# ------------------------------------------------------------------------ option validation
def finite_option(method: str, option: str, value: Any) -> float:
    """A finite float, or InvalidOptionError naming the method and option."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"{method}: {option} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidOptionError(f"{method}: {option} must be finite, got {value!r}")
    return number


def bounded_option(
    method: str, option: str, value: Any, low: float, high: float = math.inf,
    *, include_high: bool = True,
) -> float:
    """A finite float in [low, high] (or [low, high) when include_high is False)."""
    number = finite_option(method, option, value)
    above = number > high if include_high else number >= high
    if number < low or above:
        bracket = "]" if include_high else ")"
        raise InvalidOptionError(
            f"{method}: {option} must be in [{low:g}, {high:g}{bracket}, got {value!r}"
        )
    return number


def choice_option(method: str, option: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """One of ``choices``, or InvalidOptionError listing them."""
    if value not in choices:
        raise InvalidOptionError(
            f"{method}: {option} must be one of {list(choices)}, got {value!r}"
        )
    return value


class SeededRandomness:
    """Mixin for methods that draw random numbers (task orders, subsets).

    ``seed=None`` draws from PyTorch's global RNG, so ``torch.manual_seed`` makes runs
    reproducible and checkpointing the global RNG state resumes them. An int seed gives the
    method a private generator whose state ``state_dict()`` saves.
    """

    name: ClassVar[str]

    def _init_generator(self, seed: int | None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidOptionError(f"{self.name}: seed must be an int or None, got {seed!r}")
        self.seed = seed
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)

    def _randperm(self, n: int) -> np.ndarray:
        return torch.randperm(n, generator=self._generator).numpy()

    def state_dict(self) -> dict[str, Any]:
        return {} if self._generator is None else {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._generator is None:
            if state:
                raise InvalidOptionError(
                    f"{self.name} without a seed uses the global RNG and keeps no state; got "
                    f"{sorted(state)}"
                )
            return
        self._generator.set_state(state["generator"])

    def reset(self) -> None:
        self._init_generator(self.seed)
