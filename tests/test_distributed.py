"""Data parallel (``backward(..., distributed=...)``) on 2 gloo processes against one process.

The two workers are spawned once for the module; each runs every scenario below on its half of
the batch and saves what it saw. The tests compare that with references computed here, in one
process: exact mode must give the single-process update on the concatenated batch (to float32
rounding) on both ranks, the same bits; local mode the mean over ranks of each rank's
single-process update on its half.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from properties import same_state
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import deconflict
from deconflict.distributed import global_losses
from deconflict.errors import InvalidOptionError
from deconflict.methods.base import AfterStep

WORLD = 2
BATCH = 8  # per rank
TASKS = 3
STEPS = 3
LR = 0.1
TIMEOUT = 120.0


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(10, 1) for _ in range(TASKS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return z, torch.cat([head(z) for head in self.heads], dim=1)


def batch(step: int = 0, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step, or rank ``rank``'s half of it.

    Anti-correlated targets: two of the three pairs of tasks conflict, so that PCGrad's random
    order changes its update.
    """
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD * BATCH, 6, generator=generator)
    mix = torch.tensor([[1.0, -1.0, -1.0], [0.3, 0.5, -0.4], [0.0, 0.2, 0.3]])
    y = torch.randn(WORLD * BATCH, TASKS, generator=generator) @ mix
    if rank is None:
        return x, y
    return x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]


def task_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    z, out = model(x)
    return z, [((out[:, i] - y[:, i]) ** 2).mean() for i in range(TASKS)]


def grads(net: Net) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.clone() for name, p in net.named_parameters()}


def params(net: Net) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def one_step(net: Net, method: Any, x: torch.Tensor, y: torch.Tensor, *, features: bool = False,
             **options: Any) -> tuple[dict[str, torch.Tensor | None], deconflict.StepRecord]:
    """Zero the gradients, then one ``backward``: the gradients it wrote and its record."""
    net.zero_grad(set_to_none=True)
    z, losses = task_losses(net, x, y)
    record = deconflict.backward(losses, net.trunk, method, features=z if features else None,
                                 **options)
    return grads(net), record


def trajectory(net: Net, method: Any, data: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
               **options: Any) -> dict[str, torch.Tensor]:
    """STEPS steps of SGD; FAMO is told the losses after each step (global ones if distributed)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = data(step)
        optimizer.zero_grad(set_to_none=True)
        _, losses = task_losses(net, x, y)
        deconflict.backward(losses, net.trunk, method, **options)
        optimizer.step()
        if isinstance(method, AfterStep):
            with torch.no_grad():
                after = torch.stack(task_losses(net, x, y)[1])
            method.after_step(global_losses(after) if options.get("distributed") else after)
    return params(net)


# Methods checked in one exact step: (name, options, backward options).
EXACT = {
    "gradops": ("gradops", {}, {}),
    "pcgrad": ("pcgrad", {"seed": 0}, {}),
    "mgda": ("mgda", {}, {"mode": "batched"}),
    "cagrad": ("cagrad", {}, {}),
    "graddrop": ("graddrop", {"seed": 0}, {}),
    "mean": ("mean", {}, {}),
    "mgda_ub:features": ("mgda_ub", {}, {"features": True}),
    "graddrop:features": ("graddrop", {"seed": 0}, {"features": True}),
    "gradops_static": ("gradops_static", {}, {}),
    "fairgrad": ("fairgrad", {}, {}),
    "config": ("config", {}, {}),
    "krum": ("krum", {}, {}),
    "trimmed_mean": ("trimmed_mean", {"trim": 1}, {}),
    "mgda_log": ("mgda_log", {}, {}),
    "cagrad_log": ("cagrad_log", {}, {}),
    "imtl_g_log": ("imtl_g_log", {}, {"mode": "batched"}),
    "si_ls": ("si_ls", {}, {}),
    "geometric_mean": ("geometric_mean", {}, {}),
    "stch": ("stch", {}, {}),
    "pbi": ("pbi", {}, {}),
    "cosmos": ("cosmos", {}, {}),
    "aligned_mtl_ub:features": ("aligned_mtl_ub", {}, {"features": True}),
}
# Stateful methods checked over STEPS optimizer steps.
STATEFUL = {
    "gradvac": ("gradvac", {"seed": 0, "granularity": "layer"}),
    "nash_mtl": ("nash_mtl", {}),
    "dwa": ("dwa", {"steps_per_epoch": 1}),
    "famo": ("famo", {}),
    "gradnorm": ("gradnorm", {}),
    "cr_mogm": ("cr_mogm", {}),
    "moco": ("moco", {}),
    "modo": ("modo", {}),
    "excess_mtl": ("excess_mtl", {}),
    "log_losses": ("log_losses", {"base": "nash_mtl"}),
    "pcd": ("pcd", {"beta": 0.5}),
    # Not sdmgrad: 20 projected-SGD steps of lr 10 amplify the ranks' 1e-7 rounding differences
    # in M to 1e-4 in the weights (its docstring), above this comparison's tolerance.
}
LOCAL = {
    "gradops": ("gradops", {}, {}),
    "pcgrad": ("pcgrad", {"seed": 0}, {}),
    "mean": ("mean", {}, {}),
    "mgda_ub:features": ("mgda_ub", {}, {"features": True}),
}


# ------------------------------------------------------------------------------ the workers
def _outcome(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}


def _worker_scenarios(rank: int) -> dict[str, Any]:
    x, y = batch(0, rank)
    out: dict[str, Any] = {}
    for key, (name, options, extra) in EXACT.items():
        out[f"exact/{key}"] = one_step(Net(), deconflict.get(name, **options), x, y,
                                       distributed="exact", **extra)
    for key, (name, options) in STATEFUL.items():
        out[f"stateful/{key}"] = trajectory(Net(), deconflict.get(name, **options),
                                            lambda step: batch(step, rank), distributed="exact")
    for key, (name, options, extra) in LOCAL.items():
        out[f"local/{key}"] = one_step(Net(), deconflict.get(name, **options), x, y,
                                       distributed="local", **extra)

    # Rank 1's PCGrad starts from another seed: exact mode gives it rank 0's generator.
    out["state_sync"] = one_step(Net(), deconflict.PCGrad(seed=rank), x, y, distributed="exact")
    # No seed: the draws come from rank 0's global generator, rank 1's is left as it was.
    net = Net()
    torch.manual_seed(100 + rank)
    before = torch.get_rng_state()
    out["global_rng"] = one_step(net, deconflict.PCGrad(), x, y, distributed="exact")
    out["global_rng_untouched"] = torch.equal(before, torch.get_rng_state())

    # DDP wrapper: the forward under no_sync, deconflict communicates. Rank 1 builds another
    # model; DDP's construction broadcasts rank 0's.
    net = Net(seed=rank)
    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    method = deconflict.GradOPS()
    for step in range(STEPS):
        xs, ys = batch(step, rank)
        optimizer.zero_grad(set_to_none=True)
        with model.no_sync():
            _, out_ = model(xs)
            losses = [((out_[:, i] - ys[:, i]) ** 2).mean() for i in range(TASKS)]
            deconflict.backward(losses, net.trunk, method, distributed="exact")
        optimizer.step()
    out["ddp"] = params(net)

    # Gradient accumulation over two micro-batches onto gradients already there.
    for mode in ("exact", "local"):
        net = Net()
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        for step in (0, 1):
            _, losses = task_losses(net, *batch(step, rank))
            deconflict.backward(losses, net.trunk, "gradops", distributed=mode)
        out[f"accumulate/{mode}"] = grads(net)

    # Errors: the same on every rank, or told to the other rank; .grad left as it was.
    net = Net()
    tracker = deconflict.track(net.trunk)
    _, losses = task_losses(net, x, y)
    out["error/gramian"] = _outcome(lambda: deconflict.backward(
        losses, net.trunk, "mgda", mode="gramian", distributed="exact"))
    out["error/auto_tracked"] = _outcome(lambda: deconflict.backward(
        losses, net.trunk, "mgda", distributed="exact"))
    tracker.remove()
    size = BATCH if rank == 0 else BATCH - 2
    z, losses = task_losses(net, x[:size], y[:size])
    out["error/batch_sizes"] = _outcome(lambda: deconflict.backward(
        losses, net.trunk, "mgda_ub", features=z, distributed="exact"))
    for mode in ("exact", "local"):
        net = Net()
        for p in net.parameters():
            p.grad = torch.full_like(p, 2.0)
        _, losses = task_losses(net, x, y)
        if rank == 1:
            losses[1] = losses[1] * float("nan")
        out[f"error/nan_loss/{mode}"] = _outcome(lambda: deconflict.backward(
            losses, net.trunk, "gradops", distributed=mode))  # noqa: B023 - called at once
        out[f"error/nan_loss/{mode}/grads"] = grads(net)
        handle = net.heads[0].weight.register_hook(lambda g: g * float("nan")) \
            if rank == 1 else None
        _, losses = task_losses(net, x, y)
        out[f"error/one_rank/{mode}"] = _outcome(lambda: deconflict.backward(
            losses, net.trunk, "gradops", distributed=mode))  # noqa: B023 - called at once
        out[f"error/one_rank/{mode}/grads"] = grads(net)
        if handle is not None:
            handle.remove()
        # Loss weighting (one backward pass) with a NaN in one task's shared gradient on rank 1:
        # named there, told to rank 0, and no rank's method state advances.
        method = deconflict.get("uw")
        one_step(net, method, x, y, distributed=mode)
        state, before = copy.deepcopy(method.state_dict()), grads(net)
        z, losses = task_losses(net, x, y)
        if rank == 1:
            losses[2] = losses[2] + torch.sqrt(z[0, 0] * 0)
        out[f"error/weighted_nan/{mode}"] = _outcome(lambda: deconflict.backward(
            losses, net.trunk, method, distributed=mode))  # noqa: B023 - called at once
        out[f"error/weighted_nan/{mode}/same"] = (
            same_state(method.state_dict(), state)
            and all(torch.equal(a, b) for a, b in zip(grads(net).values(), before.values(),
                                                      strict=True)))
    # A GradScaler overflow on rank 1 only: every rank's scaler must skip the step.
    for mode in ("exact", "local"):
        net = Net()
        before = params(net)
        optimizer = torch.optim.SGD(net.parameters(), lr=LR)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        _, losses = task_losses(net, x, y)
        if rank == 1:
            losses[0] = losses[0] * float("inf")
        record = deconflict.backward(losses, net.trunk, "gradops", scaler=scaler,
                                     distributed=mode)
        scaler.step(optimizer)
        scaler.update()
        out[f"scaler_overflow/{mode}"] = {"skipped": record.skipped, "before": before,
                                          "after": params(net), "scale": scaler.get_scale()}
    # The ranks are still in step after all that.
    out["after_errors"] = one_step(Net(), "gradops", x, y, distributed="exact")
    return out


def _worker(rank: int, init: str, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.save(_worker_scenarios(rank), Path(directory) / f"rank{rank}.pt")
        dist.barrier()  # leave together (see runner._rank_main)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(_worker, args=(f"file://{directory / 'store'}", str(directory)),
                                 nprocs=WORLD, join=False, start_method="spawn")
    try:
        import time
        deadline = time.monotonic() + TIMEOUT
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} workers did not finish in {TIMEOUT:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------------------- references
def reference_step(name: str, options: dict, extra: dict) -> dict[str, torch.Tensor | None]:
    return one_step(Net(), deconflict.get(name, **options), *batch(0), **extra)[0]


def reference_local(name: str, options: dict, extra: dict) -> dict[str, torch.Tensor | None]:
    """The documented local-mode result: the mean of each rank's single-process update."""
    shards = [one_step(Net(), deconflict.get(name, **options), *batch(0, r), **extra)[0]
              for r in range(WORLD)]
    return {key: sum(s[key] for s in shards) / WORLD for key in shards[0]}


def assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")


def assert_same_bits(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert (first[key] is None and second[key] is None) or torch.equal(first[key],
                                                                           second[key]), key


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("key", list(EXACT))
def test_exact_equals_one_process_on_the_global_batch(ranks: list, key: str) -> None:
    expected = reference_step(*EXACT[key])
    (first, record), (second, other) = ranks[0][f"exact/{key}"], ranks[1][f"exact/{key}"]
    assert_close(first, expected)
    assert_same_bits(first, second)
    if record.weights is not None:
        assert torch.equal(record.weights, other.weights)
    assert record.communication.mode == "exact" and record.communication.world_size == WORLD


@pytest.mark.parametrize("key", list(STATEFUL))
def test_exact_stateful_trajectory(ranks: list, key: str) -> None:
    name, options = STATEFUL[key]
    expected = trajectory(Net(), deconflict.get(name, **options), batch)
    assert_close(ranks[0][f"stateful/{key}"], expected)
    assert_same_bits(ranks[0][f"stateful/{key}"], ranks[1][f"stateful/{key}"])


@pytest.mark.parametrize("key", list(LOCAL))
def test_local_is_the_mean_of_the_ranks_updates(ranks: list, key: str) -> None:
    expected = reference_local(*LOCAL[key])
    assert_close(ranks[0][f"local/{key}"][0], expected)
    assert_same_bits(ranks[0][f"local/{key}"][0], ranks[1][f"local/{key}"][0])


def test_local_differs_from_exact(ranks: list) -> None:
    """The approximation is real: GradOPS on each half, averaged, is not GradOPS on the whole."""
    local, exact = ranks[0]["local/gradops"][0], ranks[0]["exact/gradops"][0]
    assert not torch.allclose(local["trunk.0.weight"], exact["trunk.0.weight"], atol=1e-4)


def test_method_state_comes_from_rank_0(ranks: list) -> None:
    expected = one_step(Net(), deconflict.PCGrad(seed=0), *batch(0))[0]
    other = one_step(Net(), deconflict.PCGrad(seed=1), *batch(0))[0]
    assert not torch.equal(other["trunk.0.weight"], expected["trunk.0.weight"]), \
        "the seeds must give other orders"
    assert_close(ranks[1]["state_sync"][0], expected)
    assert_same_bits(ranks[0]["state_sync"][0], ranks[1]["state_sync"][0])


def test_unseeded_method_draws_from_rank_0s_generator(ranks: list) -> None:
    net = Net()  # seeds the global generator: first
    torch.manual_seed(100)
    expected = one_step(net, deconflict.PCGrad(), *batch(0))[0]
    net = Net()
    torch.manual_seed(101)  # rank 1's seed
    other = one_step(net, deconflict.PCGrad(), *batch(0))[0]
    assert not torch.equal(other["trunk.0.weight"], expected["trunk.0.weight"]), \
        "the seeds must give other orders"
    assert_close(ranks[1]["global_rng"][0], expected)
    assert_same_bits(ranks[0]["global_rng"][0], ranks[1]["global_rng"][0])
    assert ranks[1]["global_rng_untouched"]
    record = ranks[0]["global_rng"][1]
    assert record.communication.broadcast_bytes == torch.get_rng_state().numel()


def test_ddp_wrapped_model_with_no_sync(ranks: list) -> None:
    expected = trajectory(Net(), deconflict.GradOPS(), batch)
    assert_close(ranks[0]["ddp"], expected)
    assert_same_bits(ranks[0]["ddp"], ranks[1]["ddp"])


@pytest.mark.parametrize("mode", ["exact", "local"])
def test_gradient_accumulation_averages_only_what_the_call_adds(ranks: list, mode: str) -> None:
    total = {name: torch.ones_like(p) for name, p in Net().named_parameters()}
    for step in (0, 1):
        if mode == "exact":
            added = one_step(Net(), "gradops", *batch(step))[0]
        else:
            shards = [one_step(Net(), "gradops", *batch(step, r))[0] for r in range(WORLD)]
            added = {key: sum(s[key] for s in shards) / WORLD for key in shards[0]}
        total = {key: total[key] + added[key] for key in total}
    assert_close(ranks[0][f"accumulate/{mode}"], total)
    assert_same_bits(ranks[0][f"accumulate/{mode}"], ranks[1][f"accumulate/{mode}"])


def test_communication_volume(ranks: list) -> None:
    net = Net()
    d = sum(p.numel() for p in net.trunk.parameters())
    h = sum(p.numel() for p in net.heads.parameters())
    n_heads = len(list(net.heads.parameters()))
    n_all = len(list(net.parameters()))
    exact = ranks[0]["exact/gradops"][1].communication
    # T d (Jacobian) + h (heads) + one flag per averaged tensor and one failure flag.
    assert exact.all_reduce_elements == TASKS * d + h + n_heads + 1
    assert exact.all_reduce_bytes == 4 * exact.all_reduce_elements
    assert exact.all_gather_elements == TASKS + 2  # the losses and the layout check
    local = ranks[0]["local/gradops"][1].communication
    assert local.all_reduce_elements == d + h + n_all + 1
    weighted = ranks[0]["exact/mean"][1].communication
    assert weighted.all_reduce_elements == d + h + n_all + 1
    features = ranks[0]["exact/mgda_ub:features"][1].communication
    assert features.all_gather_elements == TASKS + 3 + TASKS * BATCH * 10
    assert features.all_reduce_elements == d + h + n_all + 1


def test_exact_rejects_gramian_mode(ranks: list) -> None:
    for rank in ranks:
        for key in ("error/gramian", "error/auto_tracked"):
            assert rank[key]["error"] == "InvalidOptionError"
            assert "mode='sequential' or 'batched'" in rank[key]["message"]


def test_unequal_batches_in_representation_mode(ranks: list) -> None:
    for rank in ranks:
        assert rank["error/batch_sizes"]["error"] == "ShapeError"
        assert "same batch size on every rank" in rank["error/batch_sizes"]["message"]


@pytest.mark.parametrize("mode", ["exact", "local"])
def test_a_nan_loss_on_one_rank_raises_on_every_rank(ranks: list, mode: str) -> None:
    for rank, where in zip(ranks, ("on rank 1", "on this rank"), strict=True):
        outcome = rank[f"error/nan_loss/{mode}"]
        assert outcome["error"] == "NonFiniteError" and where in outcome["message"]
        assert all(torch.equal(g, torch.full_like(g, 2.0))
                   for g in rank[f"error/nan_loss/{mode}/grads"].values())


@pytest.mark.parametrize("mode", ["exact", "local"])
def test_an_error_on_one_rank_is_told_to_the_others(ranks: list, mode: str) -> None:
    assert ranks[0][f"error/one_rank/{mode}"]["error"] == "DistributedError"
    assert ranks[1][f"error/one_rank/{mode}"]["error"] == "NonFiniteGradientError"
    for rank in ranks:
        assert all(torch.equal(g, torch.full_like(g, 2.0))
                   for g in rank[f"error/one_rank/{mode}/grads"].values())
    assert_same_bits(ranks[0]["after_errors"][0], ranks[1]["after_errors"][0])
    assert_close(ranks[0]["after_errors"][0], reference_step("gradops", {}, {}))


@pytest.mark.parametrize("mode", ["exact", "local"])
def test_a_nan_in_a_weighted_step_on_one_rank_is_named_and_undone(ranks: list, mode: str) -> None:
    assert ranks[0][f"error/weighted_nan/{mode}"]["error"] == "DistributedError"
    outcome = ranks[1][f"error/weighted_nan/{mode}"]
    assert outcome["error"] == "NonFiniteGradientError"
    assert "loss 2 with respect to shared parameter" in outcome["message"]
    assert all(rank[f"error/weighted_nan/{mode}/same"] for rank in ranks)


def test_needs_an_initialized_process_group() -> None:
    assert not dist.is_initialized()
    net = Net()
    _, losses = task_losses(net, *batch(0))
    with pytest.raises(InvalidOptionError, match=r"needs torch\.distributed initialized"):
        deconflict.backward(losses, net.trunk, "mgda", distributed="exact")
    with pytest.raises(InvalidOptionError, match="distributed must be"):
        deconflict.backward(losses, net.trunk, "mgda", distributed="everywhere")
    with pytest.raises(InvalidOptionError, match="process_group is given"):
        deconflict.backward(losses, net.trunk, "mgda", process_group=object())
    assert all(p.grad is None for p in net.parameters())
    assert math.isfinite(losses[0].item())


@pytest.mark.parametrize("mode", ["exact", "local"])
def test_a_scaler_overflow_on_one_rank_skips_the_step_on_every_rank(ranks: list,
                                                                     mode: str) -> None:
    """Rank 1's scaled loss overflows; no rank may step (their parameters would drift apart),
    and every rank's scaler lowers its scale alike."""
    for rank in ranks:
        outcome = rank[f"scaler_overflow/{mode}"]
        assert_same_bits(outcome["after"], outcome["before"])
        assert outcome["scale"] == 2.0**3
    assert ranks[1][f"scaler_overflow/{mode}"]["skipped"]
