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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...diagnostics import ConflictMonitor
from ...engine import backward
from ...errors import InvalidOptionError
from .base import MethodFactory, Metric, Problem, TrainResult

INPUTS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
TARGETS = {"xor": torch.tensor([0.0, 1.0, 1.0, 0.0]), "and": torch.tensor([0.0, 0.0, 0.0, 1.0])}
TASKS = ("xor", "and")


class XorAndNet(nn.Module):
    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid())
        # Created in the authors' order (and, then xor), so a given init seed gives their weights.
        heads = {task: nn.Linear(2, 1) for task in ("and", "xor") if task in tasks}
        self.heads = nn.ModuleDict({task: heads[task] for task in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.shared(x)
        return {task: head(z).squeeze(-1) for task, head in self.heads.items()}


class XorAnd(Problem):
    name = "xor-and"
    description = ("XOR (scaled by c) and AND from a shared 2-unit sigmoid layer: convergence "
                   "rate and epochs over seeds (tensioner paper Tables 1-2)")

    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        return TASKS

    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        per_task = tuple(m for task in TASKS for m in (
            Metric(f"converged_{task}", task, True), Metric(f"epochs_{task}", task, False)))
        return (Metric("converged", "all", True), Metric("epochs", "all", False), *per_task)

    def default_config(self) -> dict[str, Any]:
        return {"scale": 1.0, "lr": 0.05, "momentum": 0.9, "batch_size": 2, "max_epochs": 3000,
                "threshold": 1e-3, "convergence": "code", "init_seed": 136}

    def smoke_config(self) -> dict[str, Any]:
        config = self.default_config()
        config["max_epochs"] = 30
        return config

    def train(self, method_factory: MethodFactory, config: Mapping[str, Any], seed: int,
              device: torch.device, tasks: Sequence[str] | None = None,
              progress: bool = False) -> TrainResult:
        tasks = tuple(tasks or TASKS)
        init_seed = config["init_seed"]
        torch.manual_seed(seed if init_seed is None else init_seed)
        model = XorAndNet(tasks)
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"],
                                    momentum=config["momentum"])
        method = method_factory()
        targets = {"xor": TARGETS["xor"] * config["scale"], "and": TARGETS["and"]}
        generator = torch.Generator().manual_seed(seed)
        statistics = ConflictMonitor(method, task_names=tasks)
        converged_at: dict[str, float] = {task: math.nan for task in tasks}

        def task_losses(index: torch.Tensor) -> list[torch.Tensor]:
            outputs = model(INPUTS[index])
            return [nn.functional.mse_loss(outputs[t], targets[t][index]) for t in tasks]

        if config["convergence"] not in ("code", "full_batch"):
            raise InvalidOptionError("xor-and: convergence must be 'code' or 'full_batch'")
        for epoch in range(1, config["max_epochs"] + 1):
            order = torch.randperm(4, generator=generator)
            epoch_loss = torch.zeros(len(tasks))
            for start in range(0, 4, config["batch_size"]):
                index = order[start:start + config["batch_size"]]
                losses = task_losses(index)
                epoch_loss += torch.stack(losses).detach()
                optimizer.zero_grad(set_to_none=True)
                statistics.observe(backward(losses, model.shared, method))
                optimizer.step()
                if method.needs_losses_after_step:
                    with torch.no_grad():
                        method.after_step(torch.stack(task_losses(index)))
            end_epoch = getattr(method, "end_epoch", None)
            if end_epoch is not None:
                end_epoch()
            if config["convergence"] == "code":
                measured = epoch_loss / (4 * len(tasks))
            else:
                with torch.no_grad():
                    measured = torch.stack(task_losses(torch.arange(4)))
            for task, loss in zip(tasks, measured.tolist(), strict=True):
                below = loss < config["threshold"]
                if below and math.isnan(converged_at[task]):
                    converged_at[task] = float(epoch)
                elif not below and config["convergence"] == "full_batch":
                    converged_at[task] = math.nan
            if all(not math.isnan(v) for v in converged_at.values()):
                break
        joint = epoch if all(not math.isnan(v) for v in converged_at.values()) else math.nan
        metrics: dict[str, float] = {"converged": float(not math.isnan(joint)), "epochs": joint}
        for task in tasks:
            metrics[f"converged_{task}"] = float(not math.isnan(converged_at[task]))
            metrics[f"epochs_{task}"] = converged_at[task]
        if len(tasks) < len(TASKS):  # single-task baseline: the joint columns do not apply
            metrics = {k: v for k, v in metrics.items() if k.endswith(tasks)}
        summary = statistics.summary()
        summary["epochs_run"] = epoch
        return TrainResult({"validation": metrics, "test": metrics}, summary,
                           f"XOR targets scaled by c = {config['scale']:g}")
