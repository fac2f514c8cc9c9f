"""The training step the step and memory benchmarks time: an MLP trunk of ~5M parameters.

Trunk 512 -> 1792 -> 1792 -> 512 (ReLU), 5.05M parameters; one Linear(512, 1) head per task;
batch 256; squared-error losses on random targets; Adam. A step is: zero the gradients, forward,
the per-task gradients and the method (or a plain backward of the summed loss), optimizer step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import deconflict

BATCH = 256
WIDTHS = (512, 1792, 1792, 512)

# (label, deconflict name and options, TorchJD aggregator and arguments, LibMTL class and kwargs)
METHODS: dict[str, tuple[tuple[str, dict], tuple[str, dict] | None, tuple[str, dict] | None]] = {
    "UPGrad": (("upgrad", {}), ("UPGrad", {}), None),
    "MGDA": (("mgda", {}), ("MGDA", {}), ("MGDA", {"mgda_gn": "none"})),
    "PCGrad": (("pcgrad", {}), ("PCGrad", {}), ("PCGrad", {})),
    "IMTL-G": (("imtl_g", {}), ("IMTLG", {}), ("IMTL", {})),
    "CAGrad": (("cagrad", {"c": 0.5, "rescale": 1}), ("CAGrad", {"c": 0.5}),
               ("CAGrad", {"calpha": 0.5, "rescale": 1})),
    "GradOPS": (("gradops", {}), None, None),
}
MODES = ("sequential", "batched", "gramian", "features")


def trunk(widths: tuple[int, ...] = WIDTHS) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


@dataclass
class Workload:
    trunk: nn.Sequential
    heads: nn.ModuleList
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(self.x)
        losses = [((head(z).squeeze(-1) - target) ** 2).mean()
                  for head, target in zip(self.heads, self.y, strict=True)]
        return z, losses


def workload(tasks: int, seed: int = 0, widths: tuple[int, ...] = WIDTHS,
             batch: int = BATCH) -> Workload:
    torch.manual_seed(seed)
    body = trunk(widths)
    heads = nn.ModuleList(nn.Linear(widths[-1], 1) for _ in range(tasks))
    optimizer = torch.optim.Adam([*body.parameters(), *heads.parameters()], lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    return Workload(body, heads, optimizer, torch.randn(batch, widths[0], generator=generator),
                    torch.randn(tasks, batch, generator=generator))


def step(kind: str, method: str | None, tasks: int, *, widths: tuple[int, ...] = WIDTHS,
         batch: int = BATCH) -> tuple[Callable[[], None], Workload]:
    """A training step of ``kind``; each call builds its own model.

    Kinds: "plain" (backward of the summed loss), "deconflict:<mode>", "gradients:<mode>" (the
    per-task gradients of that mode and nothing else: the floor under the method),
    "torchjd" and "torchjd:gramian" (``jac_to_grad`` with ``optimize_gramian_computation``),
    "libmtl".
    """
    work = workload(tasks, widths=widths, batch=batch)
    params = list(work.trunk.parameters())
    if kind == "plain":
        def run() -> None:
            sum(work.forward()[1]).backward()
    elif kind.startswith("deconflict:"):
        mode = kind.split(":", 1)[1]
        name, options = METHODS[method][0]
        instance = deconflict.get(name, **options)
        if mode == "gramian":
            deconflict.track(work.trunk)

        def run() -> None:
            z, losses = work.forward()
            if mode == "features":
                deconflict.backward(losses, work.trunk, instance, features=z)
            else:
                deconflict.backward(losses, work.trunk, instance, mode=mode)
    elif kind.startswith("gradients:"):
        # The floor of a mode: its T backward passes, plus what the plain step also does (the
        # forward pass, the optimizer step on every parameter), nothing else. Every parameter
        # gets some task's gradient as .grad, without arithmetic, so Adam does its full work.
        mode = kind.split(":", 1)[1]
        everything = [*params, *work.heads.parameters()]

        def run() -> None:
            _, losses = work.forward()
            if mode == "sequential":
                for k, loss in enumerate(losses):
                    grads = torch.autograd.grad(loss, everything, retain_graph=k < len(losses) - 1,
                                                allow_unused=True)
            else:
                batched = torch.autograd.grad(torch.stack(losses), everything,
                                              torch.eye(len(losses)), is_grads_batched=True,
                                              allow_unused=True)
                grads = [None if g is None else g[0] for g in batched]
            for p, g in zip(everything, grads, strict=True):
                p.grad = torch.zeros_like(p) if g is None else g
    elif kind.startswith("torchjd"):
        import torchjd.aggregation as aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward

        cls, options = METHODS[method][1]
        aggregator = getattr(aggregation, cls)(**options)
        optimize = kind == "torchjd:gramian"

        def run() -> None:
            z, losses = work.forward()
            mtl_backward(losses, features=z)
            jac_to_grad(params, aggregator, optimize_gramian_computation=optimize)
    elif kind == "libmtl":
        from _libmtl import on_model

        cls, kwargs = METHODS[method][2]
        weighting = on_model(cls, params, tasks)
        if weighting is None:
            raise RuntimeError("LibMTL is not installed (pip install --no-deps LibMTL==1.1.5)")

        def run() -> None:
            _, losses = work.forward()
            weighting.backward(torch.stack(losses), **kwargs)
    else:
        raise ValueError(f"unknown step kind {kind!r}")

    def timed_step() -> None:
        work.optimizer.zero_grad(set_to_none=True)
        run()
        work.optimizer.step()

    return timed_step, work


def available(kind: str, method: str | None, tasks: int) -> str | None:
    """Why a step cannot run (None if it can)."""
    if kind.startswith("torchjd") and METHODS[method][1] is None:
        return "not in TorchJD"
    if kind == "libmtl":
        spec = METHODS[method][2]
        if spec is None:
            return "not in LibMTL"
        if spec[0] == "CAGrad" and tasks != 3:
            return "LibMTL's CAGrad is written for 3 tasks"
        from _libmtl import weighting
        if weighting(spec[0]) is None:
            return "LibMTL not installed"
    return None
