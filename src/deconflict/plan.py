"""The step plan: what one ``backward`` call will do, decided and validated before any autograd.

``plan_step`` takes the method and the options of ``backward`` (and what they depend on: whether
features are given, the trunk's tracker if it is tracked, the reducer, the loss scale) and
returns a frozen ``StepPlan``, or raises ``InvalidOptionError`` for a combination that cannot
run. Every such combination is refused here, so the engine only executes plans, and the rules
are testable without a network (``tests/test_step_plan.py``).

The gradient source a plan chooses:

- "weighted": loss weighting (``LossWeighting`` without ``compute_gramian``): c from the losses
  (GradNorm: and the last shared layer's Gramian), then one backward pass of sum_i c_i L_i;
- "jacobian": the per-task Jacobian of the shared parameters, T backward passes one at a time
  (mode "sequential") or vectorized ``chunk_size`` at a time ("batched");
- "features": the per-task Jacobian of the shared features, then one backward pass of the
  combined update through the trunk (``docs/methods.md#representation-mode``);
- "tracked": the Gramian from the tracked trunk's layer calls, never the Jacobian ("gramian").

``mode="auto"`` is "gramian" when the trunk is tracked, no features are given and the method's
weights come from the Gramian alone (``update.weighs_by_gramian``), else "sequential"; auto's
Gramian mode takes one sweep of the rows unless the trunk was tracked with ``max_sweeps``,
whereas mode="gramian" bounds its memory by sweeping in groups (``tracking.sweeps_for``). Why
(measured side by side on the MLP, CNN and Transformer workloads, ``docs/performance.md``,
"Gramian-only mode and mode='auto'"):

- both are exact for these methods, and Gramian mode was as fast as the sequential mode or
  faster at T = 3 and 10 on all three, with less memory than the Jacobian: its layer rules
  do what the Jacobian modes do where that is cheapest (the per-task parameter gradients of
  convolution, attention and normalization layers: the same passes, hence a tie on the CNN
  and the Transformer) and less elsewhere (the kernel trick on wide Linear layers; the update
  written from the rules, without a second backward pass). The number of tasks does not
  change the order, so the plan does not need it;
- untracked, the choice is between the Jacobian modes: "sequential" is never far from the
  fastest and is robust - "batched" won on the MLP at T = 10 but lost at T = 3 and lost on the
  Transformer, whose attention backward has no vmap batching rule on CPU (a loop), and it
  holds T backward passes' activation gradients at once. Pass mode="batched" explicitly where
  it measures faster. The plan does not know the model's layers, so it does not guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .distributed import NO_REDUCER, Reducer
from .errors import InvalidOptionError
from .jacobian import check_chunk_size
from .methods.base import (
    BlockWeighting,
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
    Method,
)
from .scaling import NO_SCALE, LossScale
from .tracking import LayerTracker, sweeps_for
from .update import last_layer_scope, weighs_by_gramian

HeadWeights = Literal["auto", "unit", "method"]
Mode = Literal["auto", "sequential", "batched", "gramian"]
MODES = ("auto", "sequential", "batched", "gramian")
HEAD_WEIGHTS = ("auto", "unit", "method")
Source = Literal["weighted", "jacobian", "features", "tracked"]


@dataclass(frozen=True)
class StepPlan:
    """A validated ``backward`` step (see the module docstring); built by ``plan_step``.

    >>> import deconflict
    >>> plan = plan_step(deconflict.get("upgrad"), mode="batched", chunk_size=2)
    >>> plan.source, plan.mode, plan.chunk_size, plan.heads_first
    ('jacobian', 'batched', 2, True)
    """

    method: Method
    mode: Literal["sequential", "batched", "gramian"]
    source: Source
    chunk_size: int | None  # rows differentiated together (1: one at a time, None: all)
    features: bool
    head_weights: HeadWeights
    retain_graph: bool
    reducer: Reducer = NO_REDUCER
    scale: LossScale = NO_SCALE
    tracker: LayerTracker | None = None
    # Gramian mode: the most groups of layers the rows may be swept in (``tracking.sweeps_for``).
    max_sweeps: int = 1

    @property
    def per_task(self) -> bool:
        """Whether the step computes each task's gradient (or the Gramian of them)."""
        return self.source != "weighted"

    @property
    def record_mode(self) -> str:
        """``StepRecord.mode``: the mode, or "losses" for one weighted backward pass."""
        return "losses" if self.source == "weighted" else self.mode

    @property
    def heads_first(self) -> bool:
        """Whether the heads' gradient is known before the method runs (it needs no c)."""
        return self.head_weights != "method" and not isinstance(self.method, LossWeighting)

    @property
    def last_layer(self) -> bool:
        """Whether the weighted pass first needs the last shared layer's Gramian (GradNorm)."""
        return self.source == "weighted" and last_layer_scope(self.method)

    @property
    def exchanges(self) -> bool:
        """Whether the reducer exchanges Jacobian blocks (exact mode with per-task blocks)."""
        return self.reducer.exact and (self.per_task or self.last_layer)


def plan_step(
    method: Method,
    *,
    mode: str = "auto",
    features: bool = False,
    tracker: LayerTracker | None = None,
    reducer: Reducer = NO_REDUCER,
    scale: LossScale = NO_SCALE,
    head_weights: str = "auto",
    compute_gramian: bool | None = None,
    chunk_size: int | None = None,
    retain_graph: bool = False,
) -> StepPlan:
    """The plan of ``backward(losses, trunk, method, ...)`` with these options, or
    ``InvalidOptionError`` naming what cannot be combined. ``features``: whether ``features=``
    is given; ``tracker``: the trunk's (``deconflict.tracker_of``), None if it is not tracked.

    >>> import deconflict
    >>> plan_step(deconflict.get("mean")).source
    'weighted'
    >>> plan_step(deconflict.get("graddrop"), mode="gramian")
    Traceback (most recent call last):
    ...
    deconflict.errors.InvalidOptionError: graddrop needs more than the Gramian ...
    """
    if head_weights not in HEAD_WEIGHTS:
        raise InvalidOptionError(
            f"head_weights must be 'auto', 'unit' or 'method', got {head_weights!r}")
    if mode not in MODES:
        raise InvalidOptionError(f"mode must be one of {', '.join(map(repr, MODES))}, "
                                 f"got {mode!r}")
    check_chunk_size(chunk_size)
    if mode == "sequential" and chunk_size not in (None, 1):
        raise InvalidOptionError("chunk_size applies to mode='batched' and mode='gramian'")
    if method.needs_features and not features:
        raise InvalidOptionError(
            f"{method.name} works on the shared representation: pass features=<the trunk's output>"
        )
    loss_weighting = isinstance(method, LossWeighting)
    if compute_gramian is False and not loss_weighting:
        raise InvalidOptionError(f"{method.name} needs the per-task gradients")
    from_gramian = weighs_by_gramian(method)
    if mode == "gramian":
        if features:
            raise InvalidOptionError("mode='gramian' differentiates the parameters; it does not "
                                     "combine with features=")
        if not from_gramian:
            raise InvalidOptionError(
                f"{method.name} needs more than the Gramian (a {_protocol(method)}); use "
                "mode='sequential' or 'batched'")
        if tracker is None:
            raise InvalidOptionError(
                "mode='gramian' needs the shared trunk as a module tracked before the forward "
                "pass: call tracker = deconflict.track(trunk) once, then backward(losses, trunk, "
                "method, mode='gramian')")
    requested = mode
    if mode == "auto":
        mode = "gramian" if tracker is not None and from_gramian and not features else "sequential"
    per_task = (not isinstance(method, LossWeighting) or method.gradient_scope == "shared"
                or bool(compute_gramian))
    if not per_task and head_weights == "unit":
        raise InvalidOptionError(
            f"{method.name} does one weighted backward pass, so every parameter gets the "
            "weighted gradient; pass compute_gramian=True for head_weights='unit'")
    if head_weights == "method" and not from_gramian:
        raise InvalidOptionError(
            f"head_weights='method' needs task weights, and {method.name} has none")
    if reducer.exact and per_task and mode == "gramian":
        raise InvalidOptionError(
            "distributed='exact' needs each task's gradient on every rank, and mode="
            "'gramian' never forms them (the global Gramian needs products of different "
            f"ranks' Jacobians): run {method.name} exactly with mode='sequential' or "
            "'batched' (for mode='auto', untrack the trunk: tracker.remove()), or "
            "approximately with distributed='local'")
    source: Source = ("weighted" if not per_task else "tracked" if mode == "gramian"
                      else "features" if features else "jacobian")
    return StepPlan(
        method=method, mode=mode,  # type: ignore[arg-type]  # "auto" is resolved above
        source=source, chunk_size=1 if mode == "sequential" else chunk_size,
        features=features, head_weights=head_weights,  # type: ignore[arg-type]  # checked
        retain_graph=retain_graph, reducer=reducer, scale=scale, tracker=tracker,
        max_sweeps=sweeps_for(tracker, requested) if source == "tracked" and tracker else 1)


def _protocol(method: Method) -> str:
    """The name of the protocol class the method subclasses, for error messages."""
    for protocol in (GramianWeighting, BlockWeighting, JacobianAggregator, LossWeighting):
        if isinstance(method, protocol):
            return protocol.__name__
    return type(method).__name__
