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
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ...engine import StepRecord, backward
from ...errors import InvalidOptionError
from ...methods.base import Method

MethodFactory = Callable[[], Method]


@dataclass(frozen=True)
class Metric:
    """A reported number: its name, its task, and whether higher is better."""

    name: str
    task: str
    higher_is_better: bool


@dataclass
class TrainResult:
    """What one training run produced."""

    metrics: dict[str, dict[str, float]]  # split ("validation", "test") -> metric -> value
    statistics: dict[str, Any] = field(default_factory=dict)
    note: str = ""


class ConflictStatistics:
    """Per-step conflict measurements from the engine's StepRecords (cheap: T x T only).

    - weak non-conflict: the update does not conflict with any task gradient, (M c)_j >= 0;
    - strong non-conflict: no modified gradient conflicts with any original one (the
      ``projection_coefficients`` rows C when the method reports them: (C M) >= 0), else no
      pair of original gradients conflicts;
    - the mean number of conflicting pairs, and GradOPS's mean r per task (r > 1: dominating).
    A relative tolerance of 1e-8 absorbs rounding.
    """

    TOLERANCE = 1e-8

    def __init__(self) -> None:
        self.steps = 0
        self.with_gramian = 0
        self.weak = 0
        self.strong = 0
        self.pairs = 0.0
        self.r_sum: np.ndarray | None = None
        self.r_steps = 0

    def observe(self, record: StepRecord) -> None:
        self.steps += 1
        if record.gramian is None or record.combinations is not None:
            return
        M = record.gramian.numpy()
        norms = np.sqrt(np.maximum(np.diag(M), 0.0))
        scale = np.outer(norms, norms)
        self.with_gramian += 1
        off = ~np.eye(len(M), dtype=bool)
        conflicts = (M < -self.TOLERANCE * scale) & off
        self.pairs += conflicts.sum() / 2
        if record.weights is not None:
            c = record.weights.numpy()
            update_norm = math.sqrt(max(float(c @ M @ c), 0.0))
            self.weak += bool(np.all(M @ c >= -self.TOLERANCE * norms * update_norm))
        C = record.diagnostics.get("projection_coefficients")
        if C is not None and C.ndim == 2:
            C = C.numpy()
            modified = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", C, M, C), 0.0))
            self.strong += bool(np.all(C @ M >= -self.TOLERANCE * np.outer(modified, norms)))
        else:
            self.strong += not conflicts.any()
        r = record.diagnostics.get("r")
        if r is not None:
            r = r.numpy()
            self.r_sum = r if self.r_sum is None else self.r_sum + r
            self.r_steps += 1

    def summary(self) -> dict[str, Any]:
        if self.with_gramian == 0:
            return {"steps": self.steps, "measured_steps": 0}
        result: dict[str, Any] = {
            "steps": self.steps,
            "measured_steps": self.with_gramian,
            "strong_non_conflict_fraction": self.strong / self.with_gramian,
            "weak_non_conflict_fraction": self.weak / self.with_gramian,
            "mean_conflicting_pairs": self.pairs / self.with_gramian,
        }
        if self.r_sum is not None:
            result["mean_r"] = (self.r_sum / self.r_steps).tolist()
        return result


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

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover
        raise NotImplementedError


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
    $DECONFLICT_DATA).
    """

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

    def train(self, method_factory: MethodFactory, config: Mapping[str, Any], seed: int,
              device: torch.device, tasks: Sequence[str] | None = None,
              progress: bool = False) -> TrainResult:
        tasks = tuple(tasks or self.tasks(config))
        data = self.load(config)
        torch.manual_seed(seed)
        model = self.build_model(config, tasks, data).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"],
                                     weight_decay=config.get("weight_decay", 0.0))
        method = method_factory()
        representation = bool(config.get("representation")) or method.needs_features
        generator = torch.Generator().manual_seed(seed)
        statistics = ConflictStatistics()
        started = time.perf_counter()
        steps_per_epoch = math.ceil(len(data.train) / config["batch_size"])
        bar = tqdm(total=config["epochs"] * steps_per_epoch, disable=not progress, unit="step",
                   desc=f"{self.name}: {getattr(method, 'name', 'method')} seed {seed}",
                   leave=False)
        for _ in range(config["epochs"]):
            model.train()
            for inputs, targets in data.train.batches(config["batch_size"], generator):
                inputs = inputs.to(device)
                targets = {t: v.to(device) for t, v in targets.items()}
                features, outputs = model(inputs)
                losses = self.losses(outputs, targets, tasks)
                optimizer.zero_grad(set_to_none=True)
                record = backward(losses, model.shared, method,
                                  features=features if representation else None)
                statistics.observe(record)
                optimizer.step()
                if method.needs_losses_after_step:
                    with torch.no_grad():
                        method.after_step(torch.stack(self.losses(model(inputs)[1], targets,
                                                                  tasks)))
                bar.update()
            end_epoch = getattr(method, "end_epoch", None)
            if end_epoch is not None:
                end_epoch()
        bar.close()
        metrics = {}
        model.eval()
        with torch.no_grad():
            for split, dataset in (("validation", data.validation), ("test", data.test)):
                metrics[split] = self.evaluate(model, dataset, tasks, config)
        summary = statistics.summary()
        summary["train_seconds"] = time.perf_counter() - started
        return TrainResult(metrics, summary, data.note)


def predict(model: MultiTaskModel, dataset: Dataset, batch_size: int = 4096
            ) -> dict[str, Tensor]:
    """Concatenated task outputs over a split (call under no_grad, in eval mode)."""
    device = next(model.parameters()).device
    outputs: dict[str, list[Tensor]] = {}
    for inputs, _ in dataset.batches(batch_size):
        for task, value in model(inputs.to(device))[1].items():
            outputs.setdefault(task, []).append(value.cpu())
    return {task: torch.cat(values) for task, values in outputs.items()}
