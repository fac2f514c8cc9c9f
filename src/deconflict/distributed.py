"""Data-parallel steps over ``torch.distributed``: ``backward(..., distributed="exact" | "local")``.

Setting: R ranks (processes), each with its own batch of the same size, each computing the T
task losses as means over its batch. The global batch's loss is then L_i = (1/R) sum_r L_i^(r)
and its gradient is the ranks' average: the assumption DistributedDataParallel also makes.

"exact": the update is the single-process update on the global batch, the same bits on every
rank (every rank runs the same method on the same input).

- Per-task gradient methods (modes "sequential" and "batched"): the local Jacobian blocks are
  averaged before the method runs, J = (1/R) sum_r J^(r), and so are the losses; every rank
  writes the same J^T c. The other parameters the losses reach (the heads) get their local
  gradient averaged, as DDP would.
- Representation mode (``features=``): the ranks' features are different rows of the global
  features Z, so their per-task gradients are gathered, not averaged:
  J_Z = (1/R) [J_Z^(1), ..., J_Z^(R)] (and Z itself for Jacobian methods: GradDrop's signs). Each
  rank computes the global update u = J_Z^T c, backpropagates its own part u^(r) through its
  trunk, and the trunk gradients are summed (sum_r dZ^(r)/dtheta^T u^(r)); heads averaged.
- Loss weighting (one backward pass): c from the global losses, one local backward pass of
  sum_i c_i L_i^(r), every gradient averaged.
- Gramian-only mode cannot be exact: the global Gramian needs the products of different ranks'
  Jacobians, which that mode never forms.
- The method's state (generators, moving averages, learned weights) is broadcast from rank 0
  on the first exact call with an instance (``sync_method_state``); from then on identical
  inputs keep it identical. Random methods without a seed draw from rank 0's global generator
  (its state is broadcast each step; the other ranks' generators are left untouched).

"local": each rank runs the method on its own batch (its Jacobian, losses and state) and the
gradients it wrote are averaged: D = (1/R) sum_r D^(r), D^(r) the single-process update on rank
r's batch. An approximation: a method's guarantee holds per rank (GradOPS's non-conflict, MGDA's
common descent direction) and not, in general, for the average.

Communication per step, in elements each rank contributes (T tasks, d shared parameters, h other
parameters reached, n elements of one rank's features); ``StepRecord.communication`` counts it:

- exact, per-task gradients: all-reduce T d + h;
- exact, representation mode: all-gather T n (+ n for Jacobian methods), all-reduce d + h;
- exact, loss weighting: all-reduce d + h (T d' more for GradNorm's last layer of d' elements,
  T d for ``compute_gramian=True``);
- local, every mode: all-reduce d + h (plain DDP's volume);
- always: one all-gather of T + 2 + (number of features) float64, the losses and a check that
  every rank reaches the same tensors (a mismatch raises instead of hanging), and the flags of
  the final all-reduce (h + d tensors written, one float each);
- exact mode, random methods without a seed: a 5 KB generator state broadcast.

Gradient accumulation: only what the call adds is averaged (the existing ``.grad`` of the
tensors the losses reach is set aside during the call and added back).

How the engine uses this module: ``backward(..., distributed=...)`` builds a reducer
(``reducer_for``: ``NO_REDUCER``, or a ``ProcessGroupReducer`` in "exact" or "local" mode; a
reducer instance may also be passed as ``distributed=``). The step plan carries it, and the
engine runs its step inside ``reducer.step(method)``, calling the step's methods at fixed
points, in this order, whatever the reducer: ``handshake`` (the losses), ``prepare`` (what will
be averaged), ``exchange`` (the Jacobian blocks), ``local_part`` (representation mode's update)
and, after the step, ``finish`` (the record's communication). Leaving the ``with`` block
all-reduces what the step wrote (or tells the other ranks it failed) and puts the set-aside
gradients back.
"""

from __future__ import annotations

import pickle
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import graph
from .errors import DistributedError, InvalidOptionError, NonFiniteError, ShapeError
from .kernels import Rows
from .methods.base import JacobianAggregator, Method, SeededRandomness
from .record import Communication, StepRecord

DISTRIBUTED_MODES = ("exact", "local")
# Small tensors are concatenated into buckets of this size for one all-reduce each (DDP's default
# bucket size): one collective per tensor would pay the latency per tensor.
_BUCKET_BYTES = 25 * 2**20
# Per method instance, the process group its state was last broadcast over.
_SYNCED: weakref.WeakKeyDictionary[Method, Any] = weakref.WeakKeyDictionary()


class Reducer:
    """Data parallelism of one step: this base is no communication (this process only).

    ``step(method)`` is a context manager giving the step's collectives; the engine calls them
    at fixed points (see the module docstring). Here each one hands its input back.

    >>> import deconflict
    >>> with NO_REDUCER.step(deconflict.get("mean")) as step:
    ...     step.handshake(torch.tensor([1.0, 2.0]), [], None, False)
    tensor([1., 2.])
    """

    mode: str | None = None

    @property
    def exact(self) -> bool:
        """Whether the update is the single-process update on the global batch."""
        return self.mode == "exact"

    @contextmanager
    def step(self, method: Method) -> Iterator[StepSync]:
        """The collectives of one ``backward`` call with ``method``."""
        yield _LOCAL_STEP

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StepSync:
    """The collectives of one step, without a process group: every one is the identity."""

    def handshake(self, loss_values: Tensor, losses: Sequence[Tensor], features: Any,
                  overflow_skips: bool) -> Tensor:
        """The losses the method sees (here: this process's)."""
        return loss_values

    def prepare(self, per_task: bool, features: bool, exchanges: bool,
                shared: Sequence[tuple[str, Tensor, str]]) -> None:
        """Decide what the call's gradients need (nothing to average here)."""

    def exchange(self, blocks: list[Rows], features: list[Tensor] | None
                 ) -> tuple[list[Rows], list[Tensor] | None]:
        """The Jacobian blocks (and features) the method sees."""
        return blocks, features

    def local_part(self, updates: list[Tensor]) -> list[Tensor]:
        """This process's part of the features update."""
        return updates

    def finish(self, record: StepRecord) -> StepRecord:
        """The record, with what the step exchanged."""
        return record


_LOCAL_STEP = StepSync()
NO_REDUCER = Reducer()


@dataclass(frozen=True, repr=False)
class ProcessGroupReducer(Reducer):
    """``distributed="exact"`` or ``"local"`` over a process group (None: the default group).

    Build it once and pass it as ``backward(..., distributed=reducer)``, or let ``backward``
    build it from ``distributed=`` and ``process_group=`` (``reducer_for``).

    >>> import torch, deconflict, torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> reducer = ProcessGroupReducer("exact")
    >>> trunk, heads = torch.nn.Linear(4, 8), [torch.nn.Linear(8, 1) for _ in range(2)]
    >>> z = trunk(torch.randn(16, 4))
    >>> losses = [head(z).pow(2).mean() for head in heads]
    >>> record = deconflict.backward(losses, trunk, "upgrad", distributed=reducer)
    >>> record.communication.mode, record.communication.world_size
    ('exact', 1)
    >>> dist.destroy_process_group()
    """

    mode: str = "exact"
    group: Any = None

    def __post_init__(self) -> None:
        if self.mode not in DISTRIBUTED_MODES:
            raise InvalidOptionError(
                f"distributed must be 'exact', 'local' or None, got {self.mode!r}")

    @contextmanager
    def step(self, method: Method) -> Iterator[StepSync]:
        """One distributed step (see the module docstring): the state broadcast on the first
        exact call with ``method``, rank 0's generator for unseeded random methods, and on
        leaving, the all-reduce of what the step wrote."""
        group = _group(self.group, f"distributed={self.mode!r}")
        sync = _Sync(self.mode, group, method)
        if sync.exact and _has_state(method) and _SYNCED.get(method) is not group:
            sync.count(broadcast_bytes=_broadcast_state(method, group), collectives=1)
            _SYNCED[method] = group
        try:
            try:
                with sync.method_generator():
                    yield sync
            except Exception:
                # Once the Jacobian is exchanged, the gradient all-reduce is the only collective
                # left: joining it tells the other ranks, which would otherwise wait forever.
                if sync.prepared and not sync.pending_exchange:
                    sync.average(failed=True)
                raise
            sync.average(failed=False)
        finally:
            sync.restore()

    def __repr__(self) -> str:
        return f"ProcessGroupReducer(mode={self.mode!r}, group={self.group!r})"


def reducer_for(distributed: str | Reducer | None, process_group: Any = None) -> Reducer:
    """The reducer of ``backward(..., distributed=, process_group=)``.

    >>> reducer_for(None) is NO_REDUCER
    True
    >>> reducer_for("everywhere")
    Traceback (most recent call last):
    ...
    deconflict.errors.InvalidOptionError: distributed must be 'exact', 'local' or None, ...
    """
    if isinstance(distributed, Reducer):
        if process_group is not None:
            raise InvalidOptionError("process_group is given with a reducer instance: build the "
                                     "reducer with its group instead")
        return distributed
    if distributed is None:
        if process_group is not None:
            raise InvalidOptionError("process_group is given but distributed is None: pass "
                                     "distributed='exact' or 'local'")
        return NO_REDUCER
    if distributed not in DISTRIBUTED_MODES:
        raise InvalidOptionError(
            f"distributed must be 'exact', 'local' or None, got {distributed!r}")
    return ProcessGroupReducer(distributed, _group(process_group, f"distributed={distributed!r}"))


def sync_method_state(method: Method, process_group: Any = None) -> None:
    """Give every rank rank 0's method state (``state_dict``), e.g. after loading a checkpoint
    on rank 0 only. Exact mode does it on its first call with each method instance.

    >>> import deconflict, torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> famo = deconflict.get("famo")
    >>> sync_method_state(famo)
    >>> dist.destroy_process_group()
    """
    group = _group(process_group, "sync_method_state")
    _broadcast_state(method, group)
    _SYNCED[method] = group


def global_losses(losses: Sequence[Any] | Tensor, process_group: Any = None) -> Tensor:
    """The loss values averaged over the ranks (float64, CPU), the same bits on every rank.

    Exact mode feeds methods the global losses; pass these to what it cannot see, e.g.
    ``famo.after_step(global_losses(losses))``, so that every rank's FAMO stays identical.

    >>> import torch, torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> global_losses([torch.tensor(1.0), torch.tensor(2.0)])  # one rank: its own losses
    tensor([1., 2.], dtype=torch.float64)
    >>> dist.destroy_process_group()
    """
    group = _group(process_group, "global_losses")
    values = torch.stack([torch.as_tensor(v).detach().reshape(()).to(torch.float64).cpu()
                          for v in (losses.unbind() if isinstance(losses, Tensor) else losses)])
    device = _device(group)
    parts = [torch.empty_like(values, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, values.to(device), group=group)
    return _rank_order_mean(torch.stack(parts).cpu())


def broadcast_parameters(module: nn.Module, process_group: Any = None) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP does when it wraps a model),
    for models trained without the DDP wrapper: exact mode keeps ranks identical only if they
    start identical.

    >>> import torch, torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> model = torch.nn.Linear(2, 2)
    >>> before = model.weight.detach().clone()
    >>> broadcast_parameters(model)
    >>> torch.equal(model.weight, before)  # rank 0 keeps its own
    True
    >>> dist.destroy_process_group()
    """
    group = _group(process_group, "broadcast_parameters")
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=source, group=group)


# ---------------------------------------------------------------------------------- the step
class _Sync(StepSync):
    """The collectives of one ``backward`` call, made in the same order on every rank."""

    def __init__(self, mode: str, group: Any, method: Method) -> None:
        self.mode = mode
        self.exact = mode == "exact"
        self.group = group
        self.method = method
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = _device(group)
        self.leaves: list[Tensor] = []
        self.prepared = False
        self.pending_exchange = False
        self.targets: list[Tensor] = []  # tensors whose new gradient is averaged (or summed)
        self.summed: set[int] = set()
        self.aside: list[Tensor | None] = []  # the leaves' gradients before the call
        self.counts = dict.fromkeys(("all_reduce_elements", "all_reduce_bytes",
                                     "all_gather_elements", "all_gather_bytes", "broadcast_bytes",
                                     "collectives"), 0)

    def count(self, **amounts: int) -> None:
        for key, amount in amounts.items():
            self.counts[key] += amount

    # ---------------------------------------------------------------------- engine hooks
    def handshake(self, loss_values: Tensor, losses: Sequence[Tensor], features: Any,
                  overflow_skips: bool) -> Tensor:
        """Exchange the losses and the layout; returns the losses the method sees (the global
        ones in exact mode). A non-finite loss on any rank raises on every rank, unless a
        GradScaler turns it into a skipped step (``overflow_skips``); so does a rank that
        reaches other tensors or has other features shapes."""
        leaves = self.leaves = graph.leaves(losses)
        feature_list = [] if features is None else (
            [features] if isinstance(features, Tensor) else list(features))
        layout = [len(leaves), sum(leaf.numel() for leaf in leaves),
                  *(f.numel() if isinstance(f, Tensor) else -1 for f in feature_list)]
        local = torch.cat([loss_values, torch.tensor(layout, dtype=torch.float64)])
        gathered = torch.stack(self._all_gather(local.to(self.device))).cpu()
        T = loss_values.numel()
        values, layouts = gathered[:, :T], gathered[:, T:]
        for rank in range(1, self.world):
            if not torch.equal(layouts[rank], layouts[0]):
                raise ShapeError(self._layout_mismatch(layouts[0], layouts[rank], rank))
        for rank in range(self.world):
            bad = torch.nonzero(~torch.isfinite(values[rank])).flatten().tolist()
            if bad and not overflow_skips:
                where = "this rank" if rank == self.rank else f"rank {rank}"
                raise NonFiniteError(f"loss {bad[0]} is {values[rank, bad[0]].item()} on {where} "
                                     f"(non-finite losses there: tasks {bad})")
        return _rank_order_mean(values) if self.exact else loss_values

    def prepare(self, per_task: bool, features: bool, exchanges: bool,
                shared: Sequence[tuple[str, Tensor, str]]) -> None:
        """Decide what the call's gradients need and set the existing ``.grad`` aside.

        ``per_task``: the step computes each task's gradient; ``features``: with respect to the
        features; ``exchanges``: it will call ``exchange`` (exact mode, per-task gradients or a
        last-layer Gramian).
        """
        shared_ids = {id(p) for _, p, _ in shared}
        # Per-task exact updates are global already; representation mode's trunk gradients
        # are each rank's share of a sum over the global batch.
        keep = shared_ids if self.exact and per_task and not features else set()
        self.summed = shared_ids if self.exact and per_task and features else set()
        self.pending_exchange = self.exact and exchanges
        self.targets = [leaf for leaf in self.leaves if id(leaf) not in keep]
        # Every leaf's, so that a failure on another rank can take the whole step back.
        self.aside = [leaf.grad for leaf in self.leaves]
        for leaf in self.leaves:
            leaf.grad = None
        self.prepared = True

    def exchange(self, blocks: list[Rows], features: list[Tensor] | None
                 ) -> tuple[list[Rows], list[Tensor] | None]:
        """Exact mode: the global Jacobian blocks (and features); local mode: unchanged.

        ``features`` None: blocks of parameters, averaged. Otherwise blocks of the features,
        gathered along the batch (the features themselves too for Jacobian methods).
        """
        if self.exact and features is None:
            blocks = self._average_blocks(blocks)
        elif self.exact:
            blocks = [torch.cat(self._all_gather(_stacked(block)), dim=1).div_(self.world)
                      for block in blocks]
            if isinstance(self.method, JacobianAggregator) and features is not None:
                features = [torch.cat(self._all_gather(f.contiguous()), dim=0)
                            for f in features]
        self.pending_exchange = False
        return blocks, features

    def local_part(self, updates: list[Tensor]) -> list[Tensor]:
        """Exact representation mode: this rank's slice of each global features update."""
        if not self.exact:
            return updates
        size = [u.numel() // self.world for u in updates]
        return [u[self.rank * n:(self.rank + 1) * n] for u, n in zip(updates, size, strict=True)]

    # --------------------------------------------------------------------- around the call
    @contextmanager
    def method_generator(self) -> Iterator[None]:
        """Exact mode, random methods without a seed: draw from rank 0's global generator."""
        if not (self.exact and _draws_from_global_generator(self.method)):
            yield
            return
        state = torch.get_rng_state().to(self.device)
        dist.broadcast(state, src=dist.get_global_rank(self.group, 0), group=self.group)
        self.count(broadcast_bytes=state.numel(), collectives=1)
        if self.rank == 0:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state.cpu())
            yield

    def average(self, failed: bool) -> None:
        """All-reduce the ``.grad`` the call wrote: averaged, or summed for ``summed``.

        A rank that wrote no gradient for a tensor contributes zeros; a tensor no rank wrote
        keeps no gradient (optimizers skip it, as in one process). The last flag counts the
        ranks that failed: then nobody keeps this call's gradients.
        """
        if not self.prepared:
            raise RuntimeError("deconflict: a distributed backward finished without preparing "
                               "its gradients")
        flags = torch.tensor([*(float(leaf.grad is not None) for leaf in self.targets),
                              float(failed)], dtype=torch.float32, device=self.device)
        grads = []
        for leaf in self.targets:
            grad = leaf.grad
            if failed or grad is None:
                grad = torch.zeros_like(leaf, memory_format=torch.contiguous_format)
            elif not grad.is_contiguous():
                grad = grad.contiguous()
            grads.append(grad)
        self._all_reduce_sum([flags, *grads])
        *writers, failures = flags.tolist()
        if failures:
            for leaf in self.leaves:
                leaf.grad = None
            if failed:
                return
            raise DistributedError(
                f"{int(failures)} other rank(s) raised an error in this step (see their "
                "output); no gradient of this step was kept")
        for leaf, grad, count in zip(self.targets, grads, writers, strict=True):
            if count == 0:
                leaf.grad = None
                continue
            if id(leaf) not in self.summed:
                grad.div_(self.world)
            leaf.grad = grad

    def restore(self) -> None:
        """Add the set-aside gradients back (gradient accumulation)."""
        if not self.prepared:
            return
        for leaf, old in zip(self.leaves, self.aside, strict=True):
            if old is None:
                continue
            if leaf.grad is not None:
                old.add_(leaf.grad)
            leaf.grad = old
        self.prepared = False

    def finish(self, record: StepRecord) -> StepRecord:
        return replace(record, communication=Communication(self.mode, self.world, **self.counts))

    # ------------------------------------------------------------------------ collectives
    def _average_blocks(self, blocks: list[Rows]) -> list[Rows]:
        tensors: list[Tensor] = []
        seen: set[int] = set()

        def owned(t: Tensor) -> Tensor:
            # Rows may be broadcast views, or one zeros tensor standing for several rows: each
            # is reduced in place, so give it memory of its own.
            if id(t) in seen or not t.is_contiguous():
                t = t.clone(memory_format=torch.contiguous_format)
            seen.add(id(t))
            tensors.append(t)
            return t

        result: list[Rows] = [owned(block) if isinstance(block, Tensor)
                              else [owned(row) for row in block] for block in blocks]
        self._all_reduce_sum(tensors)
        for t in tensors:
            t.div_(self.world)
        return result

    def _all_reduce_sum(self, tensors: list[Tensor]) -> None:
        """Sum contiguous tensors across ranks in place: big ones alone, small ones bucketed."""
        groups: dict[tuple[str, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device.type, t.dtype), []).append(t)
        for group in groups.values():
            bucket: list[Tensor] = []
            size = 0
            for t in group:
                nbytes = t.numel() * t.element_size()
                if nbytes >= _BUCKET_BYTES:
                    self._all_reduce(t)
                    continue
                if size + nbytes > _BUCKET_BYTES:
                    self._reduce_bucket(bucket)
                    bucket, size = [], 0
                bucket.append(t)
                size += nbytes
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, bucket: list[Tensor]) -> None:
        if len(bucket) <= 1:
            for t in bucket:
                self._all_reduce(t)
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        self._all_reduce(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def _all_reduce(self, t: Tensor) -> None:
        dist.all_reduce(t, group=self.group)
        self.count(all_reduce_elements=t.numel(), all_reduce_bytes=t.numel() * t.element_size(),
                   collectives=1)

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        self.count(all_gather_elements=t.numel(), all_gather_bytes=t.numel() * t.element_size(),
                   collectives=1)
        return parts

    def _layout_mismatch(self, first: Tensor, other: Tensor, rank: int) -> str:
        if not torch.equal(first[:2], other[:2]):
            return (f"rank 0's losses reach {int(first[0])} tensors ({int(first[1])} elements) "
                    f"and rank {rank}'s {int(other[0])} ({int(other[1])} elements): every rank "
                    "must reach the same parameters (no data-dependent branches)")
        return (f"the features have {first[2:].long().tolist()} elements on rank 0 and "
                f"{other[2:].long().tolist()} on rank {rank}: distributed steps need the same "
                "batch size on every rank (e.g. DistributedSampler(drop_last=True))")


# ---------------------------------------------------------------------------------- helpers
def _group(process_group: Any, what: str) -> Any:
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidOptionError(
            f"{what} needs torch.distributed initialized: call "
            "torch.distributed.init_process_group() first (torchrun sets its environment up)")
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_rank(group) < 0:
        raise InvalidOptionError(f"{what}: this process is not a member of process_group")
    return group


def _device(group: Any) -> torch.device:
    # NCCL only moves CUDA tensors; gloo and MPI take CPU ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _has_state(method: Method) -> bool:
    # Decided from the class and options alone, so that every rank makes the same collectives.
    return method.stateful or (isinstance(method, SeededRandomness) and method.seed is not None)


def _draws_from_global_generator(method: Method) -> bool:
    return isinstance(method, SeededRandomness) and method.seed is None


def _broadcast_state(method: Method, group: Any) -> int:
    """Load rank 0's method state on every rank; returns the payload size in bytes."""
    holder: list[dict[str, Any] | None] = [
        method.state_dict() if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
    if dist.get_rank(group) != 0:
        method.load_state_dict(holder[0] or {})
    return len(pickle.dumps(holder[0]))


def _rank_order_mean(rows: Tensor) -> Tensor:
    """The mean of the ranks' rows, summed in rank order: the same bits on every rank."""
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total / rows.shape[0]


def _stacked(block: Rows) -> Tensor:
    return (block if isinstance(block, Tensor) else torch.stack(list(block))).contiguous()
