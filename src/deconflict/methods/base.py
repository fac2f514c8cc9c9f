"""What a method is, and the four kinds of input a method can ask for.

Most methods are a rule from the Gramian M = J J^T (T x T) of the task gradients to task weights
c, and the update of the shared parameters is D = J^T c. Each method declares its ``kind``, which
tells the engine what to compute before calling it:

- "losses": loss weighting. c depends on the loss values (and the method's state) only, so the
  engine does one ordinary backward pass of sum_i c_i L_i. ``gradient_scope`` may ask for the
  Gramian of the last shared layer (GradNorm's gradient norms) or of all shared parameters.
- "gramian": c = f(M, losses, state) (GradOPS, PCGrad, MGDA, CAGrad, ...).
- "block_gramians": one weight vector per group of parameter blocks, from that group's Gramian
  (GradVac per layer); D restricted to group k is J_k^T c^(k).
- "jacobian": the method needs the per-task gradients themselves (GradDrop's signs, DB-MTL's
  moving averages) and returns the update block by block.

Context a method may use: ``losses`` (the T loss values) and ``combinations`` (for methods that
request gradients of combinations of the losses, CAGrad-Fast's task subsampling: the R x T
matrix A whose rows were differentiated; M is then the R x R Gramian of A J and the weights are
still over the T tasks).

State. Stateful methods keep their state in attributes updated by each call and save and restore
it exactly with ``state_dict()`` / ``load_state_dict()`` (learnable weights and their optimizer
state included), so a resumed run follows the same trajectory.
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidOptionError, NonFiniteError, ShapeError
from ..linalg import as_gramian_array, single_threaded_blas, to_numpy
from .options import Option

Diagnostics = dict[str, Any]
KINDS = ("losses", "gramian", "block_gramians", "jacobian")


@dataclass(frozen=True)
class Context:
    """What a method may know besides the Gramian, validated against the number of tasks."""

    num_tasks: int
    losses: np.ndarray | None = None
    combinations: np.ndarray | None = None


class Method(ABC):
    """Base class of every method (see the module docstring for the four kinds).

    Class attributes describe the method for users and for the engine:

    - ``name``: the registry name (lower snake case); ``summary``: one line; ``paper``: citation;
    - ``family``: "scalarization", "projection", "multi-objective" or "loss weighting";
    - ``stateful``: True when the output depends on earlier calls (then see ``state_dict``);
    - ``needs_features``: the method only makes sense in representation mode (MGDA-UB);
    - ``needs_losses_after_step``: the method must be told the losses after the optimizer step
      through ``after_step`` (FAMO).
    - ``OPTIONS``: the declaration of the constructor's keyword arguments (``options.Option``);
      the constructor validates them with ``_set_options``, and ``options()``, the repr and the
      command line read the declaration.

    Gramian and loss-weighting methods implement ``_compute(M, context)``; block-Gramian methods
    ``block_weights``; Jacobian methods ``combine_jacobian``.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    family: ClassVar[str]
    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    stateful: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    needs_losses_after_step: ClassVar[bool] = False

    @property
    def kind(self) -> str:
        """What the engine computes for this method: one of ``KINDS``."""
        return "gramian"

    @property
    def gradient_scope(self) -> str:
        """For loss weighting: the Gramian it needs, "none", "last_layer" or "shared"."""
        return "shared"

    @property
    def needs_losses(self) -> bool:
        """Whether the method requires the ``losses`` context."""
        return False

    @property
    def scales_task_gradients(self) -> bool:
        """Whether task i's part of the update is c_i g_i (its gradient only scaled).

        Then the "modified gradients" of the conflict diagnostics are the c_i g_i. Methods that
        change directions (projections, alignment, moving averages) say False, and report their
        modified gradients as ``projection_coefficients`` where they have them.
        """
        return self.family != "projection"

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
        if self.kind == "jacobian":
            raise InvalidOptionError(
                f"{self.name} needs the task gradients themselves, not a Gramian: use "
                "deconflict.aggregate(J, method) or deconflict.backward"
            )
        device = gramian.device if isinstance(gramian, Tensor) else torch.device("cpu")
        M = None if gramian is None else as_gramian_array(gramian)
        ctx = self._context(M, losses, context)
        if M is None and (self.kind != "losses" or self.gradient_scope != "none"):
            raise ShapeError(f"{self.name} needs the Gramian of the task gradients")
        with single_threaded_blas():
            c, diagnostics = self._compute(M, ctx)
        c = np.asarray(c, dtype=np.float64)
        if c.shape != (ctx.num_tasks,):
            raise ShapeError(f"{self.name} returned {c.shape[0]} weights for {ctx.num_tasks} tasks")
        if not np.isfinite(c).all():
            raise NonFiniteError(f"{self.name} produced non-finite weights {c.tolist()}")
        return torch.from_numpy(c).to(device), diagnostics

    def aggregate(
        self, jacobian: Tensor, *, losses: Any = None, block_sizes: Sequence[int] | None = None
    ) -> Tensor:
        """The update (d,) for a T x d Jacobian, in J's dtype (see ``update.compute_update``).

        ``block_sizes`` splits the columns of J into parameter blocks, for methods that work per
        block (GradVac per parameter, DB-MTL); by default J is one block.
        """
        from ..update import compute_update, split_columns

        blocks, names = split_columns(jacobian, block_sizes)
        update = compute_update(self, blocks, names, names, losses=losses)
        updates = update.materialize(blocks)
        return updates[0] if len(updates) == 1 else torch.cat(updates)

    def head_coefficients(self, weights: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        """Weights of the losses in the gradient of the task-specific parameters (the heads).

        Gradient methods: ones (each head gets its ordinary gradient); loss weighting: c.
        """
        if self.kind == "losses" and weights is not None:
            return np.asarray(weights, dtype=np.float64)
        return np.ones(len(losses))

    def block_weights(
        self, gramians: np.ndarray, *, losses: Any = None
    ) -> tuple[np.ndarray, Diagnostics]:
        """Block-Gramian methods: weights (K, T) from the K group Gramians (K, T, T)."""
        raise NotImplementedError(f"{self.name} is not a block-Gramian method")

    def group_blocks(self, groups: Sequence[str]) -> list[int]:
        """Block-Gramian methods: a group index per parameter block, from the blocks' layer keys."""
        return [0] * len(groups)

    def combine_jacobian(
        self, blocks: Sequence[Tensor], *, losses: np.ndarray | None,
        features: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], Diagnostics]:
        """Jacobian methods: the update of each block (T x d_k -> d_k)."""
        raise NotImplementedError(f"{self.name} is not a Jacobian method")

    def after_step(self, losses: Any) -> None:  # noqa: B027 - only FAMO needs it
        """Tell the method the losses after the optimizer step (FAMO); others ignore it."""

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
        """The options this instance was built with (shown in its repr), as declared."""
        return {option.name: getattr(self, option.key) for option in self.OPTIONS}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{type(self).__name__}({args})"

    # -------------------------------------------------------------------------- for subclasses
    def _set_options(self, **values: Any) -> None:
        """Validate each declared option by its declaration and keep it as an attribute."""
        declared = [option.name for option in self.OPTIONS]
        if sorted(values) != sorted(declared):  # the constructor and OPTIONS disagree: a bug
            raise TypeError(f"{type(self).__name__} sets options {sorted(values)} but declares "
                            f"{declared}")
        for option in self.OPTIONS:
            setattr(self, option.key, option.validate(self.name, values[option.name]))

    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        """Weights (T,) and diagnostics from a validated float64 Gramian."""
        raise NotImplementedError(f"{self.name} does not compute weights from one Gramian")

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


class GramianWeighting(Method):
    """A rule from the Gramian M = J J^T (T x T) and the context to task weights c (T,).

    The update of the shared parameters is J^T c. ``gradient_combinations`` may ask the engine
    to differentiate combinations A L of the losses instead of the T losses (CAGrad-Fast); M is
    then the Gramian of A J and c is still over the T tasks. Implement ``_compute(M, context)``.
    """

    @property
    def kind(self) -> str:  # transitional: the engine now chooses by isinstance
        return "gramian"


class BlockWeighting(Method):
    """One weight vector per group of parameter blocks, from that group's Gramian (GradVac).

    ``group_blocks`` maps the blocks' layer keys to group indices; ``block_weights`` maps the K
    group Gramians (K, T, T) to weights (K, T); the update restricted to group k is J_k^T c^(k).
    When every block falls in one group (``single_group``) the method is a Gramian weighting.
    """

    @property
    def kind(self) -> str:  # transitional
        return "block_gramians"


class JacobianAggregator(Method):
    """A rule that needs the task gradients themselves (GradDrop's signs, DB-MTL's moving
    averages): ``combine_jacobian`` maps each block J_k (T x d_k) to its update (d_k,)."""

    @property
    def kind(self) -> str:  # transitional
        return "jacobian"


class LossWeighting(Method):
    """Base of the methods whose weights need no gradients: one ordinary backward pass."""

    family: ClassVar[str] = "loss weighting"

    @property
    def kind(self) -> str:
        return "losses"

    @property
    def gradient_scope(self) -> str:
        return "none"


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
