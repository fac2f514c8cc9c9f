"""The training steps the step, memory and GPU benchmarks time: four trunks, T heads, Adam.

Architectures (``ARCHITECTURES``; parameters of the trunk, the shared part):

- "mlp": 512 -> 1792 -> 1792 -> 512 (ReLU), 5.05M parameters; batch 256 of random inputs;
- "cnn": VGG-like, Conv2d 3x3 (padding 1) + ReLU layers 16-M-32-M-64-M-128-128-M-256-256-512
  (M: 2x2 max pooling), flattened to 2 x 2 x 512 = 2,048 features, 2.31M parameters; batch 64
  of random 32 x 32 x 3 images. The wide layers sit at the low resolutions: the forward pass
  costs 0.94 GMAC (VGG's own 64-64-M-128-... layout at this size costs 11 GMAC, which two
  cores cannot time at T = 40 within the benchmark's budget);
- "transformer": token ids (vocabulary 1,000) through an nn.Embedding of width 256, then an
  nn.TransformerEncoder of 2 nn.TransformerEncoderLayer (d_model 256, 8 heads, feed-forward
  1,024, dropout 0, batch_first), mean-pooled over the 32 tokens, 1.84M parameters; batch 64;
- "celeba": the CNN trunk with 40 binary tasks (CelebA-sized), BCE-with-logits on random
  labels instead of squared error, batch 16 (the T = 40 per-task passes of the Jacobian modes
  must fit the time budget).

One Linear(features, 1) head per task; squared-error losses on random targets (BCE for
"celeba"). A step is: zero the gradients, forward, the per-task gradients and the method (or a
plain backward of the summed loss), optimizer step. ``small=True`` builds the same layer types
at toy sizes (the GPU script's correctness checks, the memory benchmark's warm-up, smoke tests).
Every call builds its own model from the same seed, so variants never share state.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

import deconflict
from deconflict import tracking

BATCH = 256
WIDTHS = (512, 1792, 1792, 512)
ARCHITECTURES = ("mlp", "cnn", "transformer", "celeba")
# Tasks of the "celeba" workload (CelebA's 40 binary attributes).
CELEBA_TASKS = 40

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
# Kinds that need a tracked trunk (deconflict.track before the first forward pass).
# "deconflict:gramian" is mode="gramian" on a trunk tracked as usual: it sweeps the rows in
# groups of layers where their data would exceed the plain step's memory (one weighted backward
# pass for .grad; ``tracking.sweeps_for``); "deconflict:auto-tracked" is mode="auto" there,
# which takes one sweep (the fastest Gramian mode).
TRACKED = ("deconflict:gramian", "deconflict:gramian-every-cut", "deconflict:auto-tracked",
           "gradients:gramian")


def trunk(widths: tuple[int, ...] = WIDTHS) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


def vgg(channels: tuple[int | str, ...]) -> nn.Sequential:
    """Conv2d 3x3 (padding 1) + ReLU per number, 2x2 max pooling per "M", then flatten."""
    layers: list[nn.Module] = []
    previous = 3
    for entry in channels:
        if entry == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            assert isinstance(entry, int)
            layers += [nn.Conv2d(previous, entry, 3, padding=1), nn.ReLU()]
            previous = entry
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


class MeanPool(nn.Module):
    """The mean over the token dimension (batch x tokens x width -> batch x width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def encoder(vocabulary: int, width: int, heads: int, feedforward: int, layers: int
            ) -> nn.Sequential:
    """Embedding, a TransformerEncoder (dropout 0, batch first), the mean over tokens."""
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=feedforward, dropout=0.0,
                                       batch_first=True)
    return nn.Sequential(nn.Embedding(vocabulary, width),
                         nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
                         MeanPool())


# Per architecture: (full size, small size); each a dict of the builder's arguments and the
# batch, the input shape and the features' width.
_CNN = {"channels": (16, "M", 32, "M", 64, "M", 128, 128, "M", 256, 256, 512), "batch": 64,
        "image": 32, "features": 2 * 2 * 512}
_CELEBA_BATCH = 16
_CNN_SMALL = {"channels": (4, "M", 8, "M"), "batch": 6, "image": 8, "features": 2 * 2 * 8}
_TRANSFORMER = {"vocabulary": 1000, "width": 256, "heads": 8, "feedforward": 1024, "layers": 2,
                "tokens": 32, "batch": 64}
_TRANSFORMER_SMALL = {"vocabulary": 20, "width": 8, "heads": 2, "feedforward": 16, "layers": 2,
                      "tokens": 5, "batch": 6}
_MLP_SMALL = (8, 16, 8)


@dataclass
class Workload:
    trunk: nn.Module
    heads: nn.ModuleList
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    loss: str = "mse"  # "mse" (squared error) or "bce" (BCE with logits on 0/1 labels)
    architecture: str = "mlp"

    def forward(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(self.x)
        outputs = [head(z).squeeze(-1) for head in self.heads]
        if self.loss == "bce":
            losses = [functional.binary_cross_entropy_with_logits(out, target)
                      for out, target in zip(outputs, self.y, strict=True)]
        else:
            losses = [((out - target) ** 2).mean()
                      for out, target in zip(outputs, self.y, strict=True)]
        return z, losses

    def parameters(self) -> int:
        """The trunk's (shared) parameter count."""
        return sum(p.numel() for p in self.trunk.parameters())


def workload(tasks: int, seed: int = 0, widths: tuple[int, ...] = WIDTHS,
             batch: int | None = None, *, architecture: str = "mlp", small: bool = False,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
             ) -> Workload:
    """The model, optimizer and batch of ``architecture`` (``widths`` and ``batch``: the MLP's)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; one of {ARCHITECTURES}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    body: nn.Module
    if architecture == "mlp":
        widths = _MLP_SMALL if small else widths
        batch = batch or (4 if small else BATCH)
        body, features = trunk(widths), widths[-1]
        x = torch.randn(batch, widths[0], generator=generator)
    elif architecture in ("cnn", "celeba"):
        spec = _CNN_SMALL if small else _CNN
        default = int(spec["batch"])  # type: ignore[call-overload]
        if architecture == "celeba" and not small:
            default = _CELEBA_BATCH
        batch = batch or default
        body, features = vgg(spec["channels"]), int(spec["features"])  # type: ignore[arg-type]
        side = int(spec["image"])  # type: ignore[call-overload]
        x = torch.randn(batch, 3, side, side, generator=generator)
    else:
        spec = _TRANSFORMER_SMALL if small else _TRANSFORMER
        batch = batch or spec["batch"]
        body = encoder(spec["vocabulary"], spec["width"], spec["heads"], spec["feedforward"],
                       spec["layers"])
        features = spec["width"]
        x = torch.randint(0, spec["vocabulary"], (batch, spec["tokens"]), generator=generator)
    heads = nn.ModuleList(nn.Linear(features, 1) for _ in range(tasks))
    body.to(device=device, dtype=dtype)
    heads.to(device=device, dtype=dtype)
    loss = "bce" if architecture == "celeba" else "mse"
    if loss == "bce":
        y = torch.randint(0, 2, (tasks, batch), generator=generator).to(dtype)
    else:
        y = torch.randn(tasks, batch, generator=generator).to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    optimizer = torch.optim.Adam([*body.parameters(), *heads.parameters()], lr=1e-4)
    return Workload(body, heads, optimizer, x.to(device), y.to(device), loss, architecture)


def torchjd_weighting(method: str) -> Any:
    """TorchJD's Gramian weighting for ``method`` (its autogram engine's counterpart)."""
    import torchjd.aggregation as aggregation

    spec = METHODS[method][1]
    if spec is None or not hasattr(aggregation, spec[0] + "Weighting"):
        raise ValueError(f"TorchJD has no Gramian weighting for {method}")
    return getattr(aggregation, spec[0] + "Weighting")(**spec[1])


@contextmanager
def _every_cut(active: bool) -> Iterator[None]:
    """While active: ``tracking.graph_cuts`` with no budget (every valid cut used)."""
    if not active:
        yield
        return
    original = tracking.graph_cuts
    tracking.graph_cuts = lambda tracker, rows, groups, budget: original(  # type: ignore[assignment]
        tracker, rows, groups, math.inf)
    try:
        yield
    finally:
        tracking.graph_cuts = original  # type: ignore[assignment]


def step(kind: str, method: str | None, tasks: int, *, widths: tuple[int, ...] = WIDTHS,
         batch: int | None = None, architecture: str = "mlp", small: bool = False,
         device: torch.device | str = "cpu") -> tuple[Callable[[], Any], Workload]:
    """A training step of ``kind``; each call builds its own model.

    Kinds: "plain" (backward of the summed loss); "deconflict:<mode>" for the modes sequential,
    batched, gramian (tracked trunk; swept in groups where its data would exceed the plain
    step's memory), features (representation mode) and auto (the default call, untracked
    trunk); "deconflict:auto-tracked" (mode auto on a tracked trunk: the library chooses; its
    Gramian mode takes one sweep); "deconflict:gramian-every-cut" (mode="gramian" with every
    cut of the graph between its sweeps used, whatever the size of the rows' gradients there:
    ``tracking.graph_cuts`` without its budget, for the time and memory that budget trades);
    "gradients:<mode>" (the per-task gradients of the
    sequential or batched mode and nothing else: the floor under the method); "torchjd" and
    "torchjd:gramian" (autojac: ``mtl_backward`` + ``jac_to_grad``, the latter with
    ``optimize_gramian_computation``);
    "torchjd:autogram" (the autogram engine on the trunk, ``batch_dim=None``, with the method's
    Gramian weighting); "libmtl". A deconflict step returns its StepRecord.
    """
    work = workload(tasks, widths=widths, batch=batch, architecture=architecture, small=small,
                    device=device)
    params = list(work.trunk.parameters())
    run: Callable[[], Any]
    if kind == "plain":
        def run() -> None:
            sum(work.forward()[1]).backward()
    elif kind.startswith("deconflict:"):
        mode = kind.split(":", 1)[1]
        assert method is not None
        name, options = METHODS[method][0]
        instance = deconflict.get(name, **options)
        if kind in TRACKED:
            deconflict.track(work.trunk)
        every_cut = mode == "gramian-every-cut"
        mode = {"auto-tracked": "auto", "gramian-every-cut": "gramian"}.get(mode, mode)

        def run() -> deconflict.StepRecord:
            z, losses = work.forward()
            if mode == "features":
                return deconflict.backward(losses, work.trunk, instance, features=z)
            with _every_cut(every_cut):
                return deconflict.backward(losses, work.trunk, instance, mode=mode)  # type: ignore[arg-type]
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
                eye = torch.eye(len(losses), device=losses[0].device)
                batched = torch.autograd.grad(torch.stack(losses), everything, eye,
                                              is_grads_batched=True, allow_unused=True)
                grads = tuple(None if g is None else g[0] for g in batched)
            for p, g in zip(everything, grads, strict=True):
                p.grad = torch.zeros_like(p) if g is None else g
    elif kind == "torchjd:autogram":
        from torchjd.autogram import Engine

        assert method is not None
        weighting = torchjd_weighting(method)
        # Created once, before the forward passes, as TorchJD's documentation asks; the losses
        # are one scalar per task, so there is no batch dimension to exploit.
        engine = Engine(work.trunk, batch_dim=None)

        def run() -> None:
            _, losses = work.forward()
            stacked = torch.stack(losses)
            weights = weighting(engine.compute_gramian(stacked))
            stacked.backward(weights)
    elif kind.startswith("torchjd"):
        import torchjd.aggregation as aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward

        assert method is not None
        spec = METHODS[method][1]
        assert spec is not None
        aggregator = getattr(aggregation, spec[0])(**spec[1])
        optimize = kind == "torchjd:gramian"

        def run() -> None:
            z, losses = work.forward()
            mtl_backward(losses, features=z)
            jac_to_grad(params, aggregator, optimize_gramian_computation=optimize)
    elif kind == "libmtl":
        from _libmtl import on_model

        assert method is not None
        spec = METHODS[method][2]
        assert spec is not None
        cls, kwargs = spec
        libmtl_weighting = on_model(cls, params, tasks)
        if libmtl_weighting is None:
            raise RuntimeError("LibMTL is not installed (pip install --no-deps LibMTL==1.1.5)")

        def run() -> None:
            _, losses = work.forward()
            libmtl_weighting.backward(torch.stack(losses), **kwargs)
    else:
        raise ValueError(f"unknown step kind {kind!r}")

    def timed_step() -> Any:
        work.optimizer.zero_grad(set_to_none=True)
        result = run()
        work.optimizer.step()
        return result

    return timed_step, work


def available(kind: str, method: str | None, tasks: int, architecture: str = "mlp"
              ) -> str | None:
    """Why a step cannot run (None if it can)."""
    if kind.startswith("torchjd") and METHODS[method][1] is None:  # type: ignore[index]
        return "not in TorchJD"
    if kind == "torchjd:autogram":
        try:
            torchjd_weighting(method)  # type: ignore[arg-type]
        except ValueError as error:
            return str(error)
    if kind == "libmtl":
        spec = METHODS[method][2]  # type: ignore[index]
        if spec is None:
            return "not in LibMTL"
        if spec[0] == "CAGrad" and tasks != 3:
            return "LibMTL's CAGrad is written for 3 tasks"
        from _libmtl import weighting
        if weighting(spec[0]) is None:
            return "LibMTL not installed"
    return None


def first_step(kind: str, method: str | None, tasks: int, **options: Any
               ) -> tuple[Callable[[], Any] | None, str | None, Any]:
    """The step of ``kind`` built and run once: (step, None, what the first step returned, e.g.
    a StepRecord), or (None, why it cannot run, None) - not a crash.

    A variant that a library refuses for this model (e.g. Gramian mode on a module it cannot
    track) is reported with the library's message, shortened to its first line.
    """
    why = available(kind, method, tasks, options.get("architecture", "mlp"))
    if why is not None:
        return None, why, None
    try:
        run, _ = step(kind, method, tasks, **options)
        result = run()
    except Exception as error:  # the reason is the result here
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, f"{type(error).__name__}: {message}"[:200], None
    return run, None, result
