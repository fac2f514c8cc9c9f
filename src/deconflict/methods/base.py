"""What a method is: four protocols, one per kind of input a method asks for.

Most methods are a rule from the Gramian M = J J^T (T x T) of the task gradients to task weights
c, and the update of the shared parameters is D = J^T c (``docs/methods.md#notation``). Every
method subclasses exactly one protocol class, and code chooses what to compute with
``isinstance``:

- ``GramianWeighting``: c = f(M, context) (GradOPS, PCGrad, MGDA, CAGrad, UPGrad, ...). It may
  ask for the gradients of combinations A L of the losses instead (``gradient_combinations``,
  CAGrad-Fast).
- ``BlockWeighting``: one weight vector per group of parameter blocks, from that group's
  Gramian (GradVac per layer); D restricted to group k is J_k^T c^(k). With a single group
  (``single_group``) it runs wherever a Gramian weighting does, through ``weights(M)``.
- ``JacobianAggregator``: needs the per-task gradients themselves (GradDrop's signs, DB-MTL's
  moving averages) and returns the update block by block (``combine_jacobian``).
- ``LossWeighting``: c depends on the loss values (and the method's state) only, so the engine
  does one ordinary backward pass of sum_i c_i L_i (``docs/methods.md#loss-weighting``);
  ``gradient_scope`` may ask for the Gramian of the last shared layer (GradNorm) or of all
  shared parameters.

Context a method may use: ``losses`` (the T loss values) and ``combinations`` (the R x T matrix
A whose rows were differentiated, for ``gradient_combinations``: M is then the R x R Gramian of
A J and the weights are still over the T tasks).

State (``methods.state``): a stateful method declares the attributes holding its state in
``STATE``; ``state_dict()`` / ``load_state_dict()`` / ``reset()`` read that declaration, so a
resumed run follows the same trajectory and nothing outside the method needs to know its state.

Training-loop callbacks are protocols of their own, tested with ``isinstance``: ``AfterStep``
(the losses after the optimizer step, FAMO) and ``EpochEnd`` (the end of an epoch, DWA).

>>> import deconflict
>>> from deconflict.methods import AfterStep, JacobianAggregator, LossWeighting
>>> famo = deconflict.get("famo")
>>> isinstance(famo, LossWeighting), isinstance(famo, AfterStep), famo.inputs
(True, True, 'losses only')
>>> isinstance(deconflict.GradDrop(), JacobianAggregator)
True
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidOptionError, NonFiniteError, ShapeError
from ..linalg import as_gramian_array, single_threaded_blas, to_numpy
from .options import Option
from .state import GENERATOR, StateField

Diagnostics = dict[str, Any]


@dataclass(frozen=True)
class Context:
    """What a method may know besides the Gramian, validated against the number of tasks."""

    num_tasks: int
    losses: np.ndarray | None = None
    combinations: np.ndarray | None = None


@runtime_checkable
class AfterStep(Protocol):
    """A method that must be told the losses after the optimizer step, on the same batch (FAMO):
    call ``method.after_step(losses)`` after ``optimizer.step()``, before the next backward."""

    def after_step(self, losses: Any) -> None: ...


@runtime_checkable
class EpochEnd(Protocol):
    """A method that keeps per-epoch statistics (DWA): call ``method.end_epoch()`` when a
    training epoch ends."""

    def end_epoch(self) -> None: ...


class Method(ABC):
    """Base class of every method; subclass one of the four protocols below, not this.

    Class attributes describe the method for users and for the engine:

    - ``name``: the registry name (lower snake case); ``summary``: one line; ``paper``: citation;
    - ``family``: "scalarization", "projection", "multi-objective" or "loss weighting";
    - ``stateful``: True when the output depends on earlier calls;
    - ``needs_features``: the method only makes sense in representation mode (MGDA-UB);
    - ``OPTIONS``: the declaration of the constructor's keyword arguments (``options.Option``):
      the constructor hands them to ``_set_options``, and validation, ``options()``, the repr
      and the command line all read the declaration;
    - ``STATE``: the attributes that hold the state (``state.StateField``), which
      ``state_dict``, ``load_state_dict`` and ``reset`` read.

    >>> import deconflict
    >>> method = deconflict.get("nash_mtl", update_weights_every=3)
    >>> method
    NashMTL(max_norm=1.0, update_weights_every=3)
    >>> method.inputs, method.stateful, sorted(method.state_dict())
    ('Gramian', True, ['alpha', 'step'])
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    family: ClassVar[str]
    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    STATE: ClassVar[tuple[StateField, ...]] = ()
    stateful: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False

    @property
    @abstractmethod
    def inputs(self) -> str:
        """What the method computes from, in words (the ``input`` column of
        ``deconflict methods``)."""

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

    def head_coefficients(self, weights: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        """Weights of the losses in the gradient of the task-specific parameters (the heads):
        ones, each head gets its ordinary gradient (loss weighting: c)."""
        return np.ones(len(losses))

    # --------------------------------------------------------------------------------- state
    def init_state(self) -> dict[str, Any]:
        """The state of a fresh instance, by attribute (each field's codec's initial value)."""
        return {field.attribute: field.codec.initial() for field in self.STATE}

    def reset(self) -> None:
        """Forget all state: back to ``init_state()`` (stateless methods: nothing to do)."""
        for attribute, value in self.init_state().items():
            setattr(self, attribute, value)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the state declared in ``STATE`` (empty for stateless methods)."""
        return {field.saved_as: field.codec.save(getattr(self, field.attribute))
                for field in self.STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot of ``state_dict``; entries it lacks start fresh. All or nothing:
        a state that is refused leaves the method as it was."""
        known = {field.saved_as for field in self.STATE}
        unknown = sorted(set(state) - known)
        if unknown and not known:
            raise InvalidOptionError(f"{self.name} is stateless but got state {unknown}")
        if unknown:
            raise InvalidOptionError(f"{self.name} keeps no state {unknown}; its state is "
                                     f"{sorted(known)}")
        values = self.init_state()
        for field in self.STATE:
            if field.saved_as in state:
                values[field.attribute] = field.codec.load(
                    state[field.saved_as], values[field.attribute],
                    f"{self.name} state {field.saved_as!r}")
        for attribute, value in values.items():
            setattr(self, attribute, value)

    # ------------------------------------------------------------------------------- options
    def options(self) -> dict[str, Any]:
        """The options this instance was built with (shown in its repr), as declared."""
        return {option.name: getattr(self, option.key) for option in self.OPTIONS}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.options().items())
        return f"{type(self).__name__}({args})"

    def _set_options(self, **values: Any) -> None:
        """Validate each declared option by its declaration, keep it as an attribute, and start
        from the initial state (which may depend on the options: a seed, a window)."""
        declared = [option.name for option in self.OPTIONS]
        if sorted(values) != sorted(declared):  # the constructor and OPTIONS disagree: a bug
            raise TypeError(f"{type(self).__name__} sets options {sorted(values)} but declares "
                            f"{declared}")
        for option in self.OPTIONS:
            setattr(self, option.key, option.validate(self.name, values[option.name]))
        self.reset()

    # ---------------------------------------------------------------------------- weights
    def weights(self, gramian: Any = None, *, losses: Any = None, **context: Any) -> Tensor:
        """Task weights c (T,) float64 (the update is J^T c; for loss weighting, the gradient
        of sum_i c_i L_i): ``weights_with_diagnostics`` without the diagnostics."""
        return self.weights_with_diagnostics(gramian, losses=losses, **context)[0]

    @abstractmethod
    def weights_with_diagnostics(
        self, gramian: Any = None, *, losses: Any = None, **context: Any
    ) -> tuple[Tensor, Diagnostics]:
        """Task weights and a dict of method-specific diagnostics (documented per method)."""

    def weights_of_gramian_array(self, M: np.ndarray, losses: Any = None) -> np.ndarray:
        """The weights c (T,) float64 for a Gramian the caller formed itself: the lean path of
        ``aggregate`` (``update.matrix_update``), which discards the diagnostics.

        M must be what ``as_gramian_array`` would return unchanged: a finite, exactly
        symmetric float64 T x T array with a non-negative diagonal, as the float64 kernel
        ``kernels.matrix_gramian`` forms it (it mirrors one triangle, and its diagonal is a sum
        of squares) once the caller has checked that it is finite. Nothing else is skipped:
        the losses are validated and c is refused if misshapen or not finite, as in
        ``weights_with_diagnostics``. The method gets its own copy of M, so the caller's
        stays what it was whatever the method does with it.
        """
        raise InvalidOptionError(f"{self.name} does not weigh the tasks from a Gramian")

    # --------------------------------------------------------- weights, for the subclasses
    def _checked_array(self, weights: Any, context: Context) -> np.ndarray:
        """The weights as a float64 array, refused if misshapen or not finite."""
        c = np.asarray(weights, dtype=np.float64)
        if c.shape != (context.num_tasks,):
            raise ShapeError(f"{self.name} returned {c.shape[0] if c.ndim else c.size} weights "
                             f"for {context.num_tasks} tasks")
        if not np.isfinite(c).all():
            raise NonFiniteError(f"{self.name} produced non-finite weights {c.tolist()}")
        return c

    def _inputs(
        self, gramian: Any, losses: Any, extra: dict[str, Any]
    ) -> tuple[np.ndarray | None, Context, torch.device]:
        """The validated float64 Gramian (None if not given), context and output device."""
        device = gramian.device if isinstance(gramian, Tensor) else torch.device("cpu")
        M = None if gramian is None else as_gramian_array(gramian)
        return M, self._context(M, losses, extra), device

    def _checked(
        self, result: tuple[np.ndarray, Diagnostics], context: Context, device: torch.device
    ) -> tuple[Tensor, Diagnostics]:
        """The weights as a float64 tensor on ``device``, refused if misshapen or not finite."""
        c = self._checked_array(result[0], context)
        return torch.from_numpy(c).to(device), _as_tensors(result[1])

    def _needs_gramian(self, M: np.ndarray | None) -> np.ndarray:
        if M is None:
            raise ShapeError(f"{self.name} needs the Gramian of the task gradients")
        return M

    def _context(self, M: np.ndarray | None, losses: Any, extra: dict[str, Any],
                 num_tasks: int | None = None) -> Context:
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
        elif num_tasks is not None:
            pass
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

    A new method is a subclass (``registry.register`` would also make it available by name):

    >>> import numpy as np, torch, deconflict
    >>> class UnitSum(GramianWeighting):
    ...     name, summary, paper, family = "unit_sum", "Sum of unit gradients", "-", "projection"
    ...     def _compute(self, M, context):  # c_i = 1 / ||g_i||
    ...         return 1.0 / np.sqrt(np.diag(M)), {}
    >>> J = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    >>> UnitSum().weights(J @ J.T)
    tensor([0.5000, 2.0000], dtype=torch.float64)
    >>> deconflict.aggregate(J, UnitSum())
    tensor([1., 1.])
    """

    @property
    def inputs(self) -> str:
        return "Gramian"

    def weights_with_diagnostics(
        self, gramian: Any = None, *, losses: Any = None, **context: Any
    ) -> tuple[Tensor, Diagnostics]:
        """Task weights and a dict of method-specific diagnostics (documented per method)."""
        M, ctx, device = self._inputs(gramian, losses, context)
        M = self._needs_gramian(M)
        with single_threaded_blas():
            result = self._compute(M, ctx)
        return self._checked(result, ctx, device)

    def weights_of_gramian_array(self, M: np.ndarray, losses: Any = None) -> np.ndarray:
        ctx = self._context(M, losses, {})
        with single_threaded_blas():
            result = self._compute(M.copy(), ctx)
        return self._checked_array(result[0], ctx)

    def gradient_combinations(self, num_tasks: int) -> np.ndarray | None:
        """Rows of losses to differentiate instead of the T tasks (None: the tasks themselves)."""
        return None

    @abstractmethod
    def _compute(self, M: np.ndarray, context: Context) -> tuple[np.ndarray, Diagnostics]:
        """Weights (T,) and diagnostics from a validated float64 Gramian."""


class BlockWeighting(Method):
    """One weight vector per group of parameter blocks, from that group's Gramian (GradVac).

    ``group_blocks`` maps the blocks' layer keys to group indices; ``block_weights`` maps the K
    group Gramians (K, T, T) to weights (K, T); the update restricted to group k is J_k^T c^(k).
    ``weights(M)`` treats M as one group's Gramian: with ``single_group`` (every block in one
    group) that is the whole update, so the method runs wherever a Gramian weighting does.

    >>> import deconflict
    >>> per_layer = deconflict.GradVac(granularity="layer")
    >>> per_layer.group_blocks(["0", "0", "2", "2"])  # the layer keys of four parameter blocks
    [0, 0, 1, 1]
    >>> per_layer.single_group, deconflict.GradVac().single_group
    (False, True)
    """

    @property
    def inputs(self) -> str:
        return "Gramian" if self.single_group else "Gramian per layer"

    @property
    @abstractmethod
    def single_group(self) -> bool:
        """Whether every parameter block falls in one group."""

    @abstractmethod
    def group_blocks(self, groups: Sequence[str]) -> list[int]:
        """A group index per parameter block, from the blocks' layer keys."""

    @abstractmethod
    def block_weights(
        self, gramians: np.ndarray, *, losses: Any = None
    ) -> tuple[np.ndarray, Diagnostics]:
        """Weights (K, T) from the K group Gramians (K, T, T)."""

    def weights_with_diagnostics(
        self, gramian: Any = None, *, losses: Any = None, **context: Any
    ) -> tuple[Tensor, Diagnostics]:
        """One group's weights, and ``block_weights``' diagnostics for that group."""
        M, ctx, device = self._inputs(gramian, losses, context)
        M = self._needs_gramian(M)
        with single_threaded_blas():
            weights, diagnostics = self.block_weights(M[None], losses=ctx.losses)
        return self._checked((weights[0], self._one_group(diagnostics)), ctx, device)

    def weights_of_gramian_array(self, M: np.ndarray, losses: Any = None) -> np.ndarray:
        ctx = self._context(M, losses, {})
        with single_threaded_blas():
            weights, _ = self.block_weights(M[None].copy(), losses=ctx.losses)
        return self._checked_array(weights[0], ctx)

    def _one_group(self, diagnostics: Diagnostics) -> Diagnostics:
        """``block_weights``' diagnostics of a single group, as ``weights`` reports them."""
        return diagnostics


class JacobianAggregator(Method):
    """A rule that needs the task gradients themselves (GradDrop's signs, DB-MTL's moving
    averages): ``combine_jacobian`` maps each block J_k (T x d_k) to its update (d_k,)."""

    @property
    def inputs(self) -> str:
        return "task gradients"

    @abstractmethod
    def combine_jacobian(
        self, blocks: Sequence[Tensor], *, losses: np.ndarray | None,
        features: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], Diagnostics]:
        """The update of each block (T x d_k -> d_k)."""

    def weights_with_diagnostics(
        self, gramian: Any = None, *, losses: Any = None, **context: Any
    ) -> tuple[Tensor, Diagnostics]:
        """Refused: the update is not J^T c for weights that a Gramian determines."""
        raise InvalidOptionError(
            f"{self.name} needs the task gradients themselves, not a Gramian: use "
            "deconflict.aggregate(J, method) or deconflict.backward"
        )


class LossWeighting(Method):
    """Loss weights c from the losses (and the method's state), no gradients: the engine does
    one ordinary backward pass of sum_i c_i L_i (``docs/methods.md#loss-weighting``).

    ``gradient_scope`` asks for a Gramian as well: "none" (default), "last_layer" (of the last
    shared layer, GradNorm) or "shared" (of all shared parameters). Implement
    ``_compute(M, context)``, M being that Gramian or None.
    """

    family: ClassVar[str] = "loss weighting"

    @property
    def gradient_scope(self) -> str:
        """The Gramian the weights need: "none", "last_layer" or "shared"."""
        return "none"

    @property
    def inputs(self) -> str:
        return {"none": "losses only", "last_layer": "last-layer Gramian"}.get(
            self.gradient_scope, "Gramian")

    def head_coefficients(self, weights: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        """The heads get the weighted gradient, like the shared parameters: c."""
        if weights is None:
            return super().head_coefficients(weights, losses)
        return np.asarray(weights, dtype=np.float64)

    def weights_with_diagnostics(
        self, gramian: Any = None, *, losses: Any = None, **context: Any
    ) -> tuple[Tensor, Diagnostics]:
        """Loss weights and a dict of method-specific diagnostics (documented per method)."""
        M, ctx, device = self._inputs(gramian, losses, context)
        if self.gradient_scope != "none":
            self._needs_gramian(M)
        with single_threaded_blas():
            result = self._compute(M, ctx)
        return self._checked(result, ctx, device)

    def weights_of_gramian_array(self, M: np.ndarray, losses: Any = None) -> np.ndarray:
        ctx = self._context(M, losses, {})
        with single_threaded_blas():
            result = self._compute(M.copy(), ctx)
        return self._checked_array(result[0], ctx)

    def loss_weights_array(self, num_tasks: int, losses: Any = None) -> np.ndarray:
        """The weights c (T,) float64 of a method with ``gradient_scope == "none"`` for T =
        ``num_tasks`` tasks, without a Gramian: the lean path of ``aggregate``. The losses are
        validated (their count against T) and c refused if misshapen or not finite."""
        if self.gradient_scope != "none":
            raise InvalidOptionError(f"{self.name} weighs by a Gramian, not by the losses alone")
        ctx = self._context(None, losses, {}, num_tasks=num_tasks)
        # No BLAS context: weights from T losses involve no matrix product.
        return self._checked_array(self._compute(None, ctx)[0], ctx)

    @abstractmethod
    def _compute(self, M: np.ndarray | None, context: Context) -> tuple[np.ndarray, Diagnostics]:
        """Weights (T,) and diagnostics from the context (and the Gramian of the scope)."""


def _as_tensors(diagnostics: Diagnostics) -> Diagnostics:
    return {
        key: torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value
        for key, value in diagnostics.items()
    }


class SeededRandomness:
    """Mixin for methods that draw random numbers (task orders, subsets, signs).

    ``seed=None`` draws from PyTorch's global RNG, so ``torch.manual_seed`` makes runs
    reproducible and checkpointing the global RNG state resumes them. An int seed gives the
    method a private generator, part of its state (``GENERATOR_STATE``). Declare the ``seed``
    option; list ``GENERATOR_STATE`` in ``STATE``.
    """

    GENERATOR_STATE: ClassVar[StateField] = StateField("_generator", GENERATOR, key="generator")

    seed: int | None
    _generator: torch.Generator | None

    def init_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().init_state()  # type: ignore[misc]
        state["_generator"] = None if self.seed is None else torch.Generator().manual_seed(
            self.seed)
        return state

    def _randperm(self, n: int) -> np.ndarray:
        return torch.randperm(n, generator=self._generator).numpy()
