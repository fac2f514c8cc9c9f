"""XOR and AND from one hidden layer (the tensioner paper's ablation, Section 4.2, Tables 1-2).

Data: the 4 points of {0, 1}^2; task "xor" (targets multiplied by ``scale`` c: 1 for Table 1,
10 for Table 2) and task "and". Network: shared Linear(2, 2) + sigmoid, one Linear(2, 1) head per
task, MSE per task. SGD with momentum (the authors' code: lr 0.05, momentum 0.9, mini-batches of
2 of the 4 points, so 2 steps per epoch). As in the authors' code, every run starts from the same
weights (``init_seed`` = 136; None uses the run's seed) and the run's seed only shuffles the
mini-batches. Convergence, as in the authors' code
(``convergence="code"``, default): at the end of an epoch, a task has converged once the sum of
its mini-batch losses during the epoch divided by 4 T (the points seen by all tasks) is below
``threshold`` = 1e-3, and stays converged; training stops when every task has, or at
``max_epochs`` (paper 3,000; code 2,500). ``convergence="full_batch"`` uses the losses on the 4
points after the epoch instead, and a task whose loss rises again is no longer converged.

Metrics per run: ``converged`` (0 or 1) and ``epochs`` (to convergence; NaN when it did not),
jointly and per task (``converged_xor``, ...). Over seeds, the mean of ``converged`` is the
convergence rate and the mean of ``epochs`` (NaNs skipped) the mean epochs of the converged runs,
the two columns of the paper's tables.

Trained by the shared loop (``SupervisedProblem.train``): this module gives the SGD optimizer,
the fixed initial weights, the convergence test at each epoch's end (which stops training) and
the metrics; checkpointing works as for every supervised problem, several processes do not (a
batch is 2 points).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .base import Data, Dataset, Metric, MultiTaskModel, SupervisedProblem, TrainingRun
from .settings import Setting

INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
TARGETS = {"xor": torch.tensor([0.0, 1.0, 1.0, 0.0]), "and": torch.tensor([0.0, 0.0, 0.0, 1.0])}
TASKS = ("xor", "and")


class XorAndNet(MultiTaskModel):
    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid())
        # Created in the authors' order (and, then xor), so a given init seed gives their weights.
        heads = {task: nn.Linear(2, 1) for task in ("and", "xor") if task in tasks}
        self.heads = nn.ModuleDict({task: heads[task] for task in tasks})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.shared(x)
        return z, {task: head(z).squeeze(-1) for task, head in self.heads.items()}


class XorAnd(SupervisedProblem):
    name = "xor-and"
    description = ("XOR (scaled by c) and AND from a shared 2-unit sigmoid layer: convergence "
                   "rate and epochs over seeds (tensioner paper Tables 1-2)")
    distributable = False
    not_distributed = "trains on 4 points in mini-batches of 2"
    schema = (
        Setting("scale", "float", 1.0, "factor c of the XOR targets (Table 1: 1, Table 2: 10)",
                low=0.0, open_low=True),
        Setting("lr", "float", 0.05, "SGD learning rate", low=0.0, open_low=True),
        Setting("momentum", "float", 0.9, "SGD momentum", low=0.0, high=1.0, open_high=True),
        Setting("batch_size", "int", 2, "points per step", low=1, high=4),
        Setting("max_epochs", "int", 3000, "epoch cap (paper 3,000; authors' code 2,500)", 30,
                low=1),
        Setting("threshold", "float", 1e-3, "a task has converged once its loss is below this",
                low=0.0, open_low=True),
        Setting("convergence", "str", "code", "how convergence is measured: the epoch's "
                "mini-batch losses (code) or the 4 points after the epoch (full_batch)",
                choices=("code", "full_batch")),
        Setting("init_seed", "int", 136, "seed of the initial weights, the same for every run "
                "(none: the run's seed)", low=0, optional=True),
    )

    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        return TASKS

    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        per_task = tuple(m for task in TASKS for m in (
            Metric(f"converged_{task}", task, True), Metric(f"epochs_{task}", task, False)))
        return (Metric("converged", "all", True), Metric("epochs", "all", False), *per_task)

    def load(self, config: Mapping[str, Any]) -> Data:
        points = Dataset(INPUTS, {"xor": TARGETS["xor"] * config["scale"],
                                  "and": TARGETS["and"]})
        return Data(points, points, points, f"XOR targets scaled by c = {config['scale']:g}")

    def build_model(self, config: Mapping[str, Any], tasks: Sequence[str],
                    data: Data) -> MultiTaskModel:
        return XorAndNet(tasks)

    def losses(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
               tasks: Sequence[str]) -> list[torch.Tensor]:
        return [nn.functional.mse_loss(outputs[t], targets[t]) for t in tasks]

    def epoch_count(self, config: Mapping[str, Any]) -> int:
        return int(config["max_epochs"])

    def init_seed(self, config: Mapping[str, Any], seed: int) -> int:
        return seed if config["init_seed"] is None else config["init_seed"]

    def make_optimizer(self, model: nn.Module, config: Mapping[str, Any]
                       ) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])

    def end_of_epoch(self, run: TrainingRun) -> bool:
        config, tasks = run.config, run.tasks
        converged_at = run.state.setdefault("converged_at", {task: math.nan for task in tasks})
        if config["convergence"] == "code":
            assert run.epoch_losses is not None  # every step of the epoch added its losses
            measured = run.epoch_losses / (4 * len(tasks))
        else:
            with torch.no_grad():
                everything = run.data.train
                measured = torch.stack(self.losses(run.model(everything.inputs)[1],
                                                   everything.targets, tasks))
        epoch = run.epoch + 1
        for task, loss in zip(tasks, measured.tolist(), strict=True):
            below = loss < config["threshold"]
            if below and math.isnan(converged_at[task]):
                converged_at[task] = float(epoch)
            elif not below and config["convergence"] == "full_batch":
                converged_at[task] = math.nan
        run.statistics["epochs_run"] = epoch
        return all(not math.isnan(v) for v in converged_at.values())

    def results(self, run: TrainingRun) -> dict[str, dict[str, float]]:
        tasks = run.tasks
        converged_at = run.state.get("converged_at", {task: math.nan for task in tasks})
        done = all(not math.isnan(v) for v in converged_at.values())
        joint = run.statistics.get("epochs_run", 0) if done else math.nan
        metrics: dict[str, float] = {"converged": float(done), "epochs": joint}
        for task in tasks:
            metrics[f"converged_{task}"] = float(not math.isnan(converged_at[task]))
            metrics[f"epochs_{task}"] = converged_at[task]
        if len(tasks) < len(TASKS):  # single-task baseline: the joint columns do not apply
            metrics = {k: v for k, v in metrics.items() if k.endswith(tasks)}
        return {"validation": metrics, "test": dict(metrics)}
