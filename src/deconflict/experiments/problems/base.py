"""What a benchmark problem is, and the one training loop the trained-by-steps problems share.

A ``Problem`` knows its tasks, its metrics (with their direction) and its settings, declared and
typed (``settings.Setting``: the default finishes within 10 minutes on 2 CPU cores, the smoke
value in seconds, for the tests), and trains one model with one method:
``train(method_factory, config, seed, device, tasks)`` returns the metrics on the validation and
test splits and the conflict statistics of training. ``tasks`` restricts training to a subset of
the tasks (single-task baselines). Problems register themselves by subclassing ``Problem`` with a
``name``; ``REGISTRY`` maps the names to the classes.

``SupervisedProblem.train`` is the one loop (Census-income, digits, multi-MNIST, NYUv2 and
XOR/AND), written with the public API as a user would: ``deconflict.backward`` then
``optimizer.step()``, FAMO's ``after_step`` and DWA's ``end_epoch`` when the method needs them,
checkpoints every N steps. A problem supplies what differs through hooks and never overrides the
loop: ``load``/``build_model`` (data and model), ``make_optimizer``, ``init_seed`` (the model's
initial weights), ``adjust_method`` (refuse or adapt a method), ``batches`` (an epoch's
mini-batches), ``step_losses`` (the forward pass and task losses of a batch), ``end_of_epoch``
(e.g. a convergence test that stops training), and ``results``/``evaluate`` (the metrics).

A problem whose schema holds ``TRAINING`` also takes ``optimizer`` (adam or sgd), ``momentum``
and ``patience``: early stopping on a scale-free validation score (``early_stop``), with the
best epoch's weights kept in the run's state, checkpointed with it, and restored for the
metrics.
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ...diagnostics import ConflictMonitor
from ...distributed import global_losses
from ...engine import backward
from ...errors import DataFormatError, InvalidOptionError
from ...io import save_torch
from ...methods.base import AfterStep, EpochEnd, LossWeighting, Method
from ...recon import branch
from ..multitask import MultiTaskModel
from .settings import Setting, resolve

MethodFactory = Callable[[], Method]

# Every registered problem by name, in the order the modules are imported.
REGISTRY: dict[str, type[Problem]] = {}

# Settings every supervised problem accepts beside its own. At these values a run is what it
# was before they existed, so they are left out of a configuration's identity
# (``essential_config``) and earlier run records stay valid.
NEUTRAL: tuple[Setting, ...] = (
    Setting("branch", "strs", [], "Recon: shared layers made task-specific, re-initialized per "
            "task (recon.branch); only the still-shared parameters go to the method"),
    Setting("measure_conflicts", "bool", False, "compute per-task gradients even for "
            "loss-weighting methods, so that their conflicts are measured (slower)"),
    Setting("ddp", "str", "exact", "with several processes (--nproc): how deconflict.backward "
            "combines the ranks' gradients", choices=("exact", "local")),
)
NEUTRAL_SETTINGS: dict[str, Any] = {setting.name: setting.default for setting in NEUTRAL}


def essential_config(config: Mapping[str, Any], settings: Iterable[Setting] = ()
                     ) -> dict[str, Any]:
    """``config`` without the ``NEUTRAL_SETTINGS`` at their neutral value, nor the problem's
    own ``neutral`` ``settings`` at their default."""
    neutral = dict(NEUTRAL_SETTINGS)
    neutral.update({s.name: s.default for s in settings if s.neutral})
    return {key: value for key, value in config.items()
            if not (key in neutral and _same(value, neutral[key]))}


def _same(value: Any, default: Any) -> bool:
    """Equal as recorded: lists and tuples alike (a record's JSON has lists)."""
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) == list(default)
    return bool(value == default)


# The settings most supervised problems share, with each problem's defaults.
def epochs_setting(default: int, smoke: int = 1) -> Setting:
    return Setting("epochs", "int", default, "training epochs", smoke, low=1)


def batch_size_setting(default: int, smoke: int | None = None) -> Setting:
    return Setting("batch_size", "int", default, "training examples per step",
                   default if smoke is None else smoke, low=1)


def lr_setting(default: float, smoke: float | None = None) -> Setting:
    return Setting("lr", "float", default, "learning rate", default if smoke is None else smoke,
                   low=0.0, open_low=True)


WEIGHT_DECAY = Setting("weight_decay", "float", 0.0, "Adam's L2 weight decay", low=0.0)
# The optimizer and early stopping (the tensioner paper's Table 3 protocol: SGD with momentum,
# patience 10). Neutral: at their defaults (Adam, no early stopping) a run is what it was before
# they existed and keeps its key. A problem that puts TRAINING in its schema gets them.
OPTIMIZER = Setting("optimizer", "str", "adam", "the optimizer: Adam, or SGD with momentum",
                    choices=("adam", "sgd"), neutral=True)
MOMENTUM = Setting("momentum", "float", 0.9, "SGD's momentum (optimizer=sgd only)", low=0.0,
                   high=1.0, open_high=True, neutral=True)
PATIENCE = Setting("patience", "int", None, "early stopping: stop after this many epochs "
                   "without a better validation score and restore the best epoch's weights "
                   "(none: train every epoch)", low=1, optional=True, neutral=True)
TRAINING: tuple[Setting, ...] = (OPTIMIZER, MOMENTUM, PATIENCE)
REPRESENTATION = Setting("representation", "bool", False, "give deconflict.backward the shared "
                         "representation (features=) instead of the shared parameters")
DATA = Setting("data", "path", None, "data directory (else $DECONFLICT_DATA)", optional=True)


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
    position in the data (epoch, batch, and the shuffling generator at the epoch's start), the
    problem's own state (``TrainingRun.state``, the epoch's loss sums) and the global RNGs
    (torch, NumPy, Python), so a resumed run ends exactly as an uninterrupted one.
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


def problem_names(condition: Callable[[type[Problem]], bool] = lambda cls: True) -> list[str]:
    """The registered problems' names (those whose class meets ``condition``)."""
    return [name for name, cls in REGISTRY.items() if condition(cls)]


class Problem(ABC):
    """A benchmark problem (see the module docstring).

    Class attributes: ``name`` (registers the class), ``description``, ``schema`` (its own
    settings), ``checkpointable`` and ``distributable`` (whether ``--checkpoint-every``/
    ``--resume`` and ``--nproc`` apply; ``not_checkpointed``/``not_distributed`` say why not),
    ``single_task_baseline`` (whether ``compare`` adds the single-task baseline), ``requires``
    (the modules of an optional extra a run imports: the tests skip the problem without them).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    schema: ClassVar[tuple[Setting, ...]] = ()
    checkpointable: ClassVar[bool] = False
    distributable: ClassVar[bool] = False
    not_checkpointed: ClassVar[str] = "is not checkpointed"
    not_distributed: ClassVar[str] = "runs in one process"
    single_task_baseline: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in REGISTRY and REGISTRY[cls.name].__qualname__ != cls.__qualname__:
                raise TypeError(f"two problems are named {cls.name!r}: "
                                f"{REGISTRY[cls.name].__qualname__} and {cls.__qualname__}")
            REGISTRY[cls.name] = cls

    @abstractmethod
    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        """The task names (some problems have variants with other tasks)."""

    @abstractmethod
    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        """The reported metrics, in display order."""

    @abstractmethod
    def train(self, method_factory: MethodFactory, config: Mapping[str, Any], seed: int,
              device: torch.device, tasks: Sequence[str] | None = None,
              progress: bool = False) -> TrainResult:
        """Train one model and evaluate it."""

    def settings(self) -> tuple[Setting, ...]:
        """Every setting ``--set`` may change, declared and typed."""
        return self.schema

    def default_config(self) -> dict[str, Any]:
        """Settings that finish within 10 minutes on 2 CPU cores (nyuv2: GPU-scale)."""
        return resolve(self.settings(), None, False, self.name)

    def smoke_config(self) -> dict[str, Any]:
        """Settings that finish in seconds, for the tests."""
        return resolve(self.settings(), None, True, self.name)

    def resolve_config(self, overrides: Mapping[str, Any] | None = None,
                       smoke: bool = False) -> dict[str, Any]:
        """The default (or smoke) configuration with ``overrides`` applied: each parsed by its
        declared kind (raw ``--set`` strings or typed values) and checked against its range;
        an unknown name, a bad value or a value out of range raises ``InvalidOptionError``."""
        return resolve(self.settings(), overrides, smoke, self.name)

    def check_execution(self, *, checkpoint: bool = False, nproc: int = 1) -> None:
        """Refuse, in one line, ``--checkpoint-every``/``--resume`` or ``--nproc`` > 1 where
        they do not apply to this problem."""
        if checkpoint and not self.checkpointable:
            raise InvalidOptionError(
                f"{self.name} {self.not_checkpointed}; --checkpoint-every and --resume apply "
                f"to {', '.join(problem_names(lambda cls: cls.checkpointable))}")
        if nproc > 1 and not self.distributable:
            raise InvalidOptionError(
                f"{self.name} {self.not_distributed}; --nproc applies to "
                f"{', '.join(problem_names(lambda cls: cls.distributable))}")


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


@dataclass
class TrainingRun:
    """What the shared loop's hooks see of the run in progress.

    ``epoch``: the current epoch (0-based); ``step``: optimizer steps done; ``epoch_losses``:
    the sum over the epoch's steps so far of the (detached, this process's) task losses;
    ``state``: the problem's own state across epochs (checkpointed with the run);
    ``statistics``: extra entries for the record's statistics.
    """

    problem: SupervisedProblem
    config: Mapping[str, Any]
    tasks: tuple[str, ...]
    seed: int
    data: Data
    model: MultiTaskModel
    method: Method
    epoch: int = 0
    step: int = 0
    epoch_losses: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)


class SupervisedProblem(Problem):
    """A problem trained with mini-batches by the shared loop; subclasses describe data, model,
    losses and metrics, and adapt the loop through its hooks (see the module docstring).

    Common settings (``epochs_setting``, ``batch_size_setting``, ``lr_setting``,
    ``WEIGHT_DECAY``, ``REPRESENTATION``, ``DATA``) go in a problem's ``schema``; the ``NEUTRAL``
    ones are added to every supervised problem: ``branch`` (Recon), ``measure_conflicts`` and
    ``ddp`` (several processes: "exact" or "local", see ``deconflict.backward``'s
    ``distributed``).
    """

    checkpointable = True
    distributable = True

    def settings(self) -> tuple[Setting, ...]:
        return (*self.schema, *NEUTRAL)

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

    def evaluate(self, model: MultiTaskModel, dataset: Dataset, tasks: Sequence[str],
                 config: Mapping[str, Any]) -> dict[str, float]:
        """The metrics of ``tasks`` on a split (model in eval mode, no gradients); a problem
        implements this or ``results``."""
        raise NotImplementedError(f"{type(self).__name__} implements neither evaluate nor "
                                  "results")

    # ------------------------------------------------------------------------- the hooks
    def epoch_count(self, config: Mapping[str, Any]) -> int:
        """The most epochs to train (``end_of_epoch`` may stop earlier)."""
        return int(config["epochs"])

    def init_seed(self, config: Mapping[str, Any], seed: int) -> int:
        """The seed of the model's initial weights."""
        return seed

    def make_optimizer(self, model: nn.Module, config: Mapping[str, Any]
                       ) -> torch.optim.Optimizer:
        """Adam, or with ``optimizer="sgd"`` SGD with ``momentum`` (``TRAINING``)."""
        decay = config.get("weight_decay", 0.0)
        if config.get("optimizer", "adam") == "sgd":
            return torch.optim.SGD(model.parameters(), lr=config["lr"],
                                   momentum=config.get("momentum", MOMENTUM.default),
                                   weight_decay=decay)
        if "momentum" in config and config["momentum"] != MOMENTUM.default:
            raise InvalidOptionError(f"{self.name}: momentum={config['momentum']:g} applies to "
                                     "optimizer=sgd only; add --set optimizer=sgd")
        return torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=decay)

    def adjust_method(self, method: Method, config: Mapping[str, Any]) -> Method:
        """The method to train with (a problem may refuse one that cannot work on it)."""
        return method

    def batches(self, run: TrainingRun, generator: torch.Generator
                ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """The epoch's training mini-batches, shuffled by ``generator`` (the same order for
        the same generator state: a resumed run replays it)."""
        return run.data.train.batches(run.config["batch_size"], generator)

    def step_losses(self, run: TrainingRun, inputs: Tensor, targets: Mapping[str, Tensor]
                    ) -> tuple[Tensor, list[Tensor]]:
        """(shared representation, task losses) of a batch."""
        features, outputs = run.model(inputs)
        return features, self.losses(outputs, targets, run.tasks)

    def end_of_epoch(self, run: TrainingRun) -> bool:
        """Called after each epoch (and the method's ``end_epoch``); True stops training."""
        return False

    def validation_losses(self, run: TrainingRun, batch_size: int = 4096) -> Tensor:
        """The task losses on the validation split (eval mode, no gradients): each batch's
        mean loss weighted by its size, i.e. the mean over the split for mean-reduced losses."""
        run.model.eval()
        device = next(run.model.parameters()).device
        total: Tensor | None = None
        count = 0
        with torch.no_grad():
            for inputs, targets in run.data.validation.batches(batch_size):
                losses = torch.stack(self.step_losses(
                    run, inputs.to(device), {t: v.to(device) for t, v in targets.items()})[1])
                total = losses * len(inputs) if total is None else total + losses * len(inputs)
                count += len(inputs)
        run.model.train()
        if total is None:
            raise InvalidOptionError(f"{self.name}: early stopping needs a validation split, "
                                     "and it is empty")
        return (total / count).detach().cpu()

    def early_stop(self, run: TrainingRun) -> bool:
        """After an epoch, with ``patience`` set: True once ``patience`` epochs in a row brought
        no better validation score.

        The score is scale-free, sum_t L_t / L_t^(1): each task's validation loss divided by
        its value after the first epoch, so that a task whose loss is 10 times larger does not
        decide alone (the paper's "no improvement in validation metrics during 10 epochs"
        names no single metric). The best epoch's weights are kept in ``run.state`` (hence in
        the checkpoints) and restored before the test metrics (``_restore_best``).
        """
        patience = run.config.get("patience")
        if patience is None:
            return False
        losses = self.validation_losses(run)
        state = run.state.setdefault("early_stopping", {})
        if "first" not in state:
            # A zero first loss (already perfect) counts as 1: its ratio is then the loss.
            state["first"] = torch.where(losses > 0, losses, torch.ones_like(losses))
        score = float((losses / state["first"]).sum())
        epoch = run.epoch + 1
        if "best_score" not in state or score < state["best_score"]:
            state.update(best_score=score, best_epoch=epoch,
                         best_weights={k: v.detach().clone()
                                       for k, v in run.model.state_dict().items()})
        state["epochs_run"] = epoch
        return epoch - int(state["best_epoch"]) >= int(patience)

    def _restore_best(self, run: TrainingRun) -> None:
        """With early stopping: load the best epoch's weights and record when it stopped."""
        state = run.state.get("early_stopping")
        if not state or "best_weights" not in state:
            return
        run.model.load_state_dict(state["best_weights"])
        run.statistics["best_epoch"] = int(state["best_epoch"])
        run.statistics["epochs_run"] = int(state["epochs_run"])
        run.statistics["best_validation_score"] = float(state["best_score"])

    def results(self, run: TrainingRun) -> dict[str, dict[str, float]]:
        """The metrics per split of the trained model (called without gradients)."""
        run.model.eval()
        return {split: self.evaluate(run.model, dataset, run.tasks, run.config)
                for split, dataset in (("validation", run.data.validation),
                                       ("test", run.data.test))}

    def model_for(self, config: Mapping[str, Any], tasks: Sequence[str], data: Data,
                  seed: int) -> MultiTaskModel:
        """A fresh model (seeded), with the ``branch`` layers made task-specific (Recon)."""
        torch.manual_seed(self.init_seed(config, seed))
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

    # -------------------------------------------------------------------------- the loop
    def train(self, method_factory: MethodFactory, config: Mapping[str, Any], seed: int,
              device: torch.device, tasks: Sequence[str] | None = None,
              progress: bool = False, monitor: ConflictMonitor | None = None,
              checkpoint: Checkpointing | None = None) -> TrainResult:
        """Train and evaluate; ``monitor`` (optional) observes every step's conflicts, which
        then include the loss-weighting methods' (their per-task gradients are computed);
        ``checkpoint`` saves the run every N steps and resumes it (``Checkpointing``);
        ``progress`` shows a bar over the steps with the current losses."""
        tasks = tuple(tasks or self.tasks(config))
        data = self.load(config)
        model = self.model_for(config, tasks, data, seed).to(device)
        optimizer = self.make_optimizer(model, config)
        method = self.adjust_method(method_factory(), config)
        run = TrainingRun(self, config, tasks, seed, data, model, method)
        representation = bool(config.get("representation")) or method.needs_features
        measure = monitor is not None or bool(config.get("measure_conflicts"))
        compute_gramian = True if measure and isinstance(method, LossWeighting) else None
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
        position: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "seconds": 0.0}
        identity = {"problem": self.name, "config": essential_config(config, self.settings()),
                    "seed": seed,
                    "tasks": list(tasks), "method": repr(method)}
        resumed = checkpoint is not None and checkpoint.resume and checkpoint.path.is_file()
        if checkpoint is not None and resumed:
            position = _restore(checkpoint.path, identity, run, optimizer, monitor, generator)
        started = time.perf_counter() - position["seconds"]
        epochs = self.epoch_count(config)
        steps_per_epoch = math.ceil(len(data.train) / config["batch_size"])
        from tqdm import tqdm  # the experiments extra: never imported with the library

        bar = tqdm(total=epochs * steps_per_epoch, initial=position["step"],
                   disable=not progress or rank != 0, unit="step", leave=False,
                   desc=f"{self.name}: {getattr(method, 'name', 'method')} seed {seed}")
        shown = 0.0
        run.step = position["step"]
        for epoch in range(position["epoch"], epochs):
            run.epoch = epoch
            model.train()
            # The shuffling generator as the epoch begins: a resumed run replays its order.
            epoch_order = generator.get_state()
            skip = position["batch"] if epoch == position["epoch"] else 0
            if not (resumed and epoch == position["epoch"]):
                run.epoch_losses = None
            for batch, (inputs, targets) in enumerate(self.batches(run, generator)):
                if batch < skip:
                    continue
                if world > 1:
                    if len(inputs) < world:  # every rank sees this and skips it alike
                        continue
                    inputs = inputs[rank::world]
                    targets = {t: v[rank::world] for t, v in targets.items()}
                inputs = inputs.to(device)
                targets = {t: v.to(device) for t, v in targets.items()}
                features, losses = self.step_losses(run, inputs, targets)
                detached = torch.stack(losses).detach()
                run.epoch_losses = (detached if run.epoch_losses is None
                                    else run.epoch_losses + detached)
                optimizer.zero_grad(set_to_none=True)
                record = backward(losses, shared, method,
                                  features=features if representation else None,
                                  compute_gramian=compute_gramian, **sync)
                monitor.observe(record)
                optimizer.step()
                if isinstance(method, AfterStep):
                    with torch.no_grad():
                        after = torch.stack(self.step_losses(run, inputs, targets)[1])
                        if sync.get("distributed") == "exact":
                            after = global_losses(after)
                        method.after_step(after)
                run.step += 1
                bar.update()
                if not bar.disable and time.monotonic() - shown > 0.5:
                    # The losses cost a device sync: every half second, not every step.
                    bar.set_postfix_str(_losses_text(tasks, detached), refresh=shown == 0.0)
                    shown = time.monotonic()
                if checkpoint is not None and run.step % checkpoint.every == 0:
                    save_torch(checkpoint.path, {
                        "identity": identity, "step": run.step, "epoch": epoch,
                        "batch": batch + 1, "seconds": time.perf_counter() - started,
                        "epoch_order": epoch_order, "epoch_losses": run.epoch_losses,
                        "state": run.state, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "method": method.state_dict(),
                        "monitor": monitor.state_dict(), "rng": rng_states()})
            if isinstance(method, EpochEnd):
                method.end_epoch()
            if self.end_of_epoch(run) | self.early_stop(run):  # both run: each keeps state
                break
        bar.close()
        if rank != 0:  # rank 0 evaluates and reports for all: the models are the same
            return TrainResult({}, {}, data.note, model)
        self._restore_best(run)
        with torch.no_grad():
            metrics = self.results(run)
        summary = monitor.summary()
        summary.update(run.statistics)
        summary["train_seconds"] = time.perf_counter() - started
        summary["parameters"] = sum(p.numel() for p in model.parameters())
        summary["shared_parameters"] = sum(p.numel() for _, p in shared)
        return TrainResult(metrics, summary, data.note, model)


def _losses_text(tasks: Sequence[str], losses: Tensor) -> str:
    return ", ".join(f"{task} {value:.4g}" for task, value in zip(tasks, losses.tolist(),
                                                                  strict=True))


def _process_group() -> tuple[int, int]:
    """(world size, rank) of the default process group, (1, 0) without one."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size(), distributed.get_rank()
    return 1, 0


def rng_states() -> dict[str, Any]:
    """The global RNGs' states (torch, NumPy, Python, CUDA), for a checkpoint."""
    # The legacy global NumPy state too: user code and libraries may draw from it.
    numpy_state = np.random.get_state()  # noqa: NPY002
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state,
                              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore(path: Path, identity: dict[str, Any], run: TrainingRun,
             optimizer: torch.optim.Optimizer, monitor: ConflictMonitor,
             generator: torch.Generator) -> dict[str, Any]:
    """Load a checkpoint written by ``SupervisedProblem.train`` into ``run``; the position it
    saved."""
    saved = load_checkpoint(path, identity)
    device = next(run.model.parameters()).device
    run.model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    run.method.load_state_dict(saved["method"])
    monitor.load_state_dict(saved["monitor"])
    generator.set_state(saved["epoch_order"])
    losses = saved.get("epoch_losses")
    run.epoch_losses = None if losses is None else losses.to(device)
    run.state = saved.get("state") or {}
    set_rng_states(saved["rng"])
    return {key: saved[key] for key in ("step", "epoch", "batch", "seconds")}


def load_checkpoint(path: Path, identity: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's contents, refused in one line when the file cannot be read or belongs
    to another run (``identity``: problem, configuration, seed, tasks, method)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(saved, dict):
            raise TypeError("not a checkpoint dictionary")
    except Exception as error:  # a torn or foreign file: name it and say what to do
        raise DataFormatError(f"checkpoint {path} cannot be read ({type(error).__name__}); "
                              "remove it to start the run over") from None
    if saved.get("identity") != identity:
        raise InvalidOptionError(
            f"checkpoint {path} belongs to another run ({saved.get('identity')}); remove it or "
            "run without --resume"
        )
    return saved


def set_rng_states(rng: Mapping[str, Any]) -> None:
    """Restore the global RNGs saved by ``rng_states``."""
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])  # noqa: NPY002
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def predict(model: MultiTaskModel, dataset: Dataset, batch_size: int = 4096
            ) -> dict[str, Tensor]:
    """Concatenated task outputs over a split (call under no_grad, in eval mode)."""
    device = next(model.parameters()).device
    outputs: dict[str, list[Tensor]] = {}
    for inputs, _ in dataset.batches(batch_size):
        for task, value in model(inputs.to(device))[1].items():
            outputs.setdefault(task, []).append(value.cpu())
    return {task: torch.cat(values) for task, values in outputs.items()}
