"""What a benchmark problem is, and the training loop the supervised ones share.

A ``Problem`` knows its tasks, its metrics (with their direction), a default configuration (that
finishes within 10 minutes on 2 CPU cores) and a smoke configuration (seconds, for the tests),
and trains one model with one method: ``train(method_factory, config, seed, device, tasks)``
returns the metrics on the validation and test splits and the conflict statistics of training.
``tasks`` restricts training to a subset of the tasks (single-task baselines).

Supervised problems (Census-income, digits, multi-MNIST, NYUv2) only describe their data, model,
losses and evaluation; ``SupervisedProblem.train`` is the loop, written with the public API as a
user would: ``deconflict.backward`` then ``optimizer.step()``, FAMO's ``after_step`` and DWA's
``end_epoch`` when the method needs them.
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ...diagnostics import ConflictMonitor
from ...distributed import global_losses
from ...engine import backward
from ...errors import InvalidOptionError
from ...io import save_torch
from ...methods.base import Method
from ...recon import BranchedModule, branch

MethodFactory = Callable[[], Method]

# Settings every supervised problem accepts beside its own. At these values a run is what it
# was before they existed, so they are left out of a configuration's identity
# (``essential_config``) and earlier run records stay valid.
NEUTRAL_SETTINGS: dict[str, Any] = {"branch": [], "measure_conflicts": False, "ddp": "exact"}


def essential_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the ``NEUTRAL_SETTINGS`` that are at their neutral value."""
    return {key: value for key, value in config.items()
            if not (key in NEUTRAL_SETTINGS and value == NEUTRAL_SETTINGS[key])}


@dataclass(frozen=True)
class Metric:
    """A reported number: its name, its task, and whether higher is better."""

    name: str
    task: str
    higher_is_better: bool


@dataclass
class TrainResult:
    """What one training run produced (``model``: the trained model, when the problem has one)."""

    metrics: dict[str, dict[str, float]]  # split ("validation", "test") -> metric -> value
    statistics: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    model: nn.Module | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Checkpointing:
    """Save the run's whole state every ``every`` optimizer steps to ``path`` (atomically);
    with ``resume``, continue from ``path`` if it exists.

    The state is the model, the optimizer, the method's state, the conflict monitor, the
    position in the data (epoch, batch, and the shuffling generator at the epoch's start) and
    the global RNGs (torch, NumPy, Python), so a resumed run ends exactly as an uninterrupted one.
    """

    path: Path
    every: int
    resume: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1:
            raise InvalidOptionError(f"checkpoint interval must be a positive number of steps, "
                                     f"got {self.every!r}")

    def for_rank(self, rank: int) -> Checkpointing:
        """The same plan for one rank of a distributed run: a file of its own."""
        return replace(self, path=self.path.with_name(
            f"{self.path.stem}.rank{rank}{self.path.suffix}"))


class Problem(ABC):
    """A benchmark problem (see the module docstring)."""

    name: str
    description: str

    @abstractmethod
    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        """The task names (some problems have variants with other tasks)."""

    @abstractmethod
    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        """The reported metrics, in display order."""

    @abstractmethod
    def default_config(self) -> dict[str, Any]:
        """Settings that finish within 10 minutes on 2 CPU cores."""

    @abstractmethod
    def smoke_config(self) -> dict[str, Any]:
        """Settings that finish in seconds, for the tests."""

    @abstractmethod
    def train(self, method_factory: MethodFactory, config: Mapping[str, Any], seed: int,
              device: torch.device, tasks: Sequence[str] | None = None,
              progress: bool = False) -> TrainResult:
        """Train one model and evaluate it."""

    def resolve_config(self, overrides: Mapping[str, Any] | None = None,
                       smoke: bool = False) -> dict[str, Any]:
        """The default (or smoke) configuration with ``overrides`` applied (names checked)."""
        config = self.smoke_config() if smoke else self.default_config()
        for key, value in (overrides or {}).items():
            if key not in config:
                raise InvalidOptionError(
                    f"{self.name} has no setting {key!r}; its settings are: "
                    f"{', '.join(sorted(config))}"
                )
            config[key] = value
        return config


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


@dataclass(frozen=True)
class Dataset:
    """A split as tensors: inputs and a target tensor per task."""

    inputs: Tensor
    targets: dict[str, Tensor]

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batches(self, size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        order = (torch.randperm(len(self), generator=generator) if generator is not None
                 else torch.arange(len(self)))
        for start in range(0, len(self), size):
            index = order[start:start + size]
            yield self.inputs[index], {task: t[index] for task, t in self.targets.items()}


@dataclass(frozen=True)
class Data:
    train: Dataset
    validation: Dataset
    test: Dataset
    note: str = ""


class SupervisedProblem(Problem):
    """A problem trained with mini-batches; subclasses describe data, model, losses, metrics.

    Common settings: ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``representation``
    (pass the shared features to ``deconflict.backward``), ``data`` (a directory, else
    $DECONFLICT_DATA), and the ``NEUTRAL_SETTINGS``: ``branch`` (Recon: shared layers made
    task-specific with ``recon.branch``, re-initialized per task; only the still-shared
    parameters go to the method) and ``measure_conflicts`` (per-task gradients even for
    loss-weighting methods, so that their conflicts are measured; slower) and ``ddp`` (with
    several processes: "exact" or "local", see ``deconflict.backward``'s ``distributed``).
    """

    def resolve_config(self, overrides: Mapping[str, Any] | None = None,
                       smoke: bool = False) -> dict[str, Any]:
        base = super().resolve_config(None, smoke)
        defaults = {**NEUTRAL_SETTINGS, **base}
        unknown = [key for key in (overrides or {}) if key not in defaults]
        if unknown:
            raise InvalidOptionError(
                f"{self.name} has no setting {unknown[0]!r}; its settings are: "
                f"{', '.join(sorted(defaults))}"
            )
        return {**defaults, **(overrides or {})}

    @abstractmethod
    def load(self, config: Mapping[str, Any]) -> Data:
        """The three splits (deterministic: the same for every seed)."""

    @abstractmethod
    def build_model(self, config: Mapping[str, Any], tasks: Sequence[str],
                    data: Data) -> MultiTaskModel:
        """A fresh model for these tasks."""

    @abstractmethod
    def losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               tasks: Sequence[str]) -> list[Tensor]:
        """One scalar loss per task, in ``tasks`` order."""

    @abstractmethod
    def evaluate(self, model: MultiTaskModel, dataset: Dataset, tasks: Sequence[str],
                 config: Mapping[str, Any]) -> dict[str, float]:
        """The metrics of ``tasks`` on a split (model in eval mode, no gradients)."""

    def model_for(self, config: Mapping[str, Any], tasks: Sequence[str], data: Data,
                  seed: int) -> MultiTaskModel:
        """A fresh model (seeded), with the ``branch`` layers made task-specific (Recon)."""
        torch.manual_seed(seed)
        model = self.build_model(config, tasks, data)
        layers = list(config.get("branch") or [])
        if layers:
            if not model.supports_branching:
                raise InvalidOptionError(
                    f"{self.name}: the {type(model).__name__} model has no single shared trunk "
                    "module whose layers Recon could branch"
                )
            model.shared = branch(model.shared, layers, len(tasks))
            model.shared.reset_branches()  # Recon retrains from scratch: copies start apart
        return model

    def train(self, method_factory: MethodFactory, config: Mapping[str, Any], seed: int,
              device: torch.device, tasks: Sequence[str] | None = None,
              progress: bool = False, monitor: ConflictMonitor | None = None,
              checkpoint: Checkpointing | None = None) -> TrainResult:
        """Train and evaluate; ``monitor`` (optional) observes every step's conflicts, which
        then include the loss-weighting methods' (their per-task gradients are computed);
        ``checkpoint`` saves the run every N steps and resumes it (``Checkpointing``)."""
        tasks = tuple(tasks or self.tasks(config))
        data = self.load(config)
        model = self.model_for(config, tasks, data, seed).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"],
                                     weight_decay=config.get("weight_decay", 0.0))
        method = method_factory()
        representation = bool(config.get("representation")) or method.needs_features
        measure = monitor is not None or bool(config.get("measure_conflicts"))
        compute_gramian = True if measure and method.kind == "losses" else None
        monitor = monitor or ConflictMonitor(method, task_names=tasks)
        shared = model.shared_parameters()
        world, rank = _process_group()
        # Several processes (torch.distributed initialized, e.g. by `deconflict run --nproc`):
        # each takes every world-th example of the global batch and deconflict.backward
        # combines the ranks' gradients as config["ddp"] says ("exact" or "local").
        sync = {} if world == 1 else {"distributed": config.get("ddp", "exact")}
        if world > 1 and checkpoint is not None:
            checkpoint = checkpoint.for_rank(rank)
        generator = torch.Generator().manual_seed(seed)
        position = {"step": 0, "epoch": 0, "batch": 0, "seconds": 0.0}
        identity = {"problem": self.name, "config": essential_config(config), "seed": seed,
                    "tasks": list(tasks), "method": repr(method)}
        if checkpoint is not None and checkpoint.resume and checkpoint.path.is_file():
            position = _restore(checkpoint.path, identity, model, optimizer, method, monitor,
                                generator)
        started = time.perf_counter() - position["seconds"]
        steps_per_epoch = math.ceil(len(data.train) / config["batch_size"])
        bar = tqdm(total=config["epochs"] * steps_per_epoch, initial=position["step"],
                   disable=not progress, unit="step",
                   desc=f"{self.name}: {getattr(method, 'name', 'method')} seed {seed}",
                   leave=False)
        step = position["step"]
        for epoch in range(position["epoch"], config["epochs"]):
            model.train()
            # The shuffling generator as the epoch begins: a resumed run replays its order.
            epoch_order = generator.get_state()
            skip = position["batch"] if epoch == position["epoch"] else 0
            for batch, (inputs, targets) in enumerate(
                    data.train.batches(config["batch_size"], generator)):
                if batch < skip:
                    continue
                if world > 1:
                    if len(inputs) < world:  # every rank sees this and skips it alike
                        continue
                    inputs = inputs[rank::world]
                    targets = {t: v[rank::world] for t, v in targets.items()}
                inputs = inputs.to(device)
                targets = {t: v.to(device) for t, v in targets.items()}
                features, outputs = model(inputs)
                losses = self.losses(outputs, targets, tasks)
                optimizer.zero_grad(set_to_none=True)
                record = backward(losses, shared, method,
                                  features=features if representation else None,
                                  compute_gramian=compute_gramian, **sync)
                monitor.observe(record)
                optimizer.step()
                if method.needs_losses_after_step:
                    with torch.no_grad():
                        after = torch.stack(self.losses(model(inputs)[1], targets, tasks))
                        if sync.get("distributed") == "exact":
                            after = global_losses(after)
                        method.after_step(after)
                bar.update()
                step += 1
                if checkpoint is not None and step % checkpoint.every == 0:
                    save_torch(checkpoint.path, {
                        "identity": identity, "step": step, "epoch": epoch, "batch": batch + 1,
                        "seconds": time.perf_counter() - started, "epoch_order": epoch_order,
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "method": method.state_dict(), "monitor": monitor.state_dict(),
                        "rng": _rng_states()})
            end_epoch = getattr(method, "end_epoch", None)
            if end_epoch is not None:
                end_epoch()
        bar.close()
        if rank != 0:  # rank 0 evaluates and reports for all: the models are the same
            return TrainResult({}, {}, data.note, model)
        metrics = {}
        model.eval()
        with torch.no_grad():
            for split, dataset in (("validation", data.validation), ("test", data.test)):
                metrics[split] = self.evaluate(model, dataset, tasks, config)
        summary = monitor.summary()
        summary["train_seconds"] = time.perf_counter() - started
        summary["parameters"] = sum(p.numel() for p in model.parameters())
        summary["shared_parameters"] = sum(p.numel() for _, p in shared)
        return TrainResult(metrics, summary, data.note, model)


def _process_group() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) without one."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size(), distributed.get_rank()
    return 1, 0


def _rng_states() -> dict[str, Any]:
    # The legacy global NumPy state too: user code and libraries may draw from it.
    numpy_state = np.random.get_state()  # noqa: NPY002
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state,
                              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore(path: Path, identity: dict[str, Any], model: nn.Module,
             optimizer: torch.optim.Optimizer, method: Method, monitor: ConflictMonitor,
             generator: torch.Generator) -> dict[str, Any]:
    """Load a checkpoint written by ``SupervisedProblem.train``; the position it saved."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("identity") != identity:
        raise InvalidOptionError(
            f"checkpoint {path} belongs to another run ({saved.get('identity')}); remove it or "
            "run without --resume"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    method.load_state_dict(saved["method"])
    monitor.load_state_dict(saved["monitor"])
    generator.set_state(saved["epoch_order"])
    rng = saved["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])  # noqa: NPY002
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return {key: saved[key] for key in ("step", "epoch", "batch", "seconds")}


def predict(model: MultiTaskModel, dataset: Dataset, batch_size: int = 4096
            ) -> dict[str, Tensor]:
    """Concatenated task outputs over a split (call under no_grad, in eval mode)."""
    device = next(model.parameters()).device
    outputs: dict[str, list[Tensor]] = {}
    for inputs, _ in dataset.batches(batch_size):
        for task, value in model(inputs.to(device))[1].items():
            outputs.setdefault(task, []).append(value.cpu())
    return {task: torch.cat(values) for task, values in outputs.items()}
