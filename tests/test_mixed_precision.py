"""Mixed precision: a bfloat16 autocast step for every method and mode, the Gramian's float64
accuracy under autocast, and torch.amp.GradScaler (the method sees unscaled gradients, .grad gets
the scaled update, an overflow skips the step like the scaler does)."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from properties import manual_jacobian, same_state
from torch import nn

import deconflict
from deconflict.methods.base import AfterStep, LossWeighting
from deconflict.methods.registry import method_class
from deconflict.update import weighs_by_gramian

TASKS = 3
BF16 = torch.bfloat16
ALL_METHODS = deconflict.available()
# Every method in sequential mode, and in Gramian-only mode those that need only M (or losses).
STEP_CASES = [(name, mode) for name in ALL_METHODS for mode in ("sequential", "gramian")
              if mode == "sequential" or (weighs_by_gramian(deconflict.get(name))
                                          and not deconflict.get(name).needs_features)]


class Net(nn.Module):
    """A trunk with normalization layers (LayerNorm; or Conv2d + BatchNorm2d) and T heads."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        if conv:
            self.trunk = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4),
                                       nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8))
        else:
            self.trunk = nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.ReLU(),
                                       nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(TASKS))


def make(seed: int = 0, conv: bool = False, scale: float = 1.0):
    """A network, inputs and targets (``scale`` times standard normal)."""
    torch.manual_seed(seed)
    net = Net(conv)
    x = torch.randn(12, 2, 4, 4) if conv else torch.randn(12, 5)
    return net, x, scale * torch.randn(12, TASKS)


def task_losses(net: Net, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = BF16):
    """The features and the T losses, the forward pass under CPU autocast to ``dtype``."""
    with torch.autocast("cpu", dtype=dtype or BF16, enabled=dtype is not None):
        z = net.trunk(x)
        losses = [((head(z).squeeze(-1) - y[:, t]) ** 2).mean()
                  for t, head in enumerate(net.heads)]
    return z, losses


def method(name: str) -> deconflict.Method:
    """A method with a fixed seed where it draws random numbers."""
    cls = method_class(name)
    return cls(seed=0) if "seed" in inspect.signature(cls).parameters else cls()


def features_for(name: str, z: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"features": z} if deconflict.get(name).needs_features else {}


def flat_params(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def flat_grads(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).to(torch.float64) for p in params])


def train_step(net, x, y, m, *, mode="sequential", scaler=None, dtype=BF16, lr=0.1,
               inside=False):
    """forward (autocast) -> deconflict.backward -> (scaler.)step -> FAMO's after_step."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=dtype or BF16, enabled=dtype is not None):
        z, losses = task_losses(net, x, y, dtype)
        if inside:
            record = deconflict.backward(losses, net.trunk, m, mode=mode, scaler=scaler,
                                         **features_for(m.name, z))
    if not inside:
        record = deconflict.backward(losses, net.trunk, m, mode=mode, scaler=scaler,
                                     **features_for(m.name, z))
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if isinstance(m, AfterStep) and not record.skipped:
        with torch.no_grad():
            m.after_step(torch.stack(task_losses(net, x, y, dtype)[1]))
    return record


# ------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("conv", [False, True], ids=["layernorm", "conv-batchnorm"])
@pytest.mark.parametrize(("name", "mode"), STEP_CASES)
def test_bf16_autocast_training_step_runs_for_every_method(name, mode, conv):
    """Two steps train every parameter to finite values; backward is called inside the autocast
    block for the convolutional trunk and after it for the other."""
    net, x, y = make(1, conv)
    if mode == "gramian":
        deconflict.track(net.trunk)
    m = method(name)
    trunk_before, heads_before = flat_params(net.trunk), flat_params(net.heads)
    for _ in range(2):  # the second step sees the state of stateful methods
        record = train_step(net, x, y, m, mode=mode, inside=conv)
    assert record.mode == ("losses" if isinstance(m, LossWeighting) else mode)
    assert not record.skipped
    for after, before in [(flat_params(net.trunk), trunk_before),
                          (flat_params(net.heads), heads_before)]:
        assert torch.isfinite(after).all()
        assert not torch.equal(after, before)


@pytest.mark.parametrize(("name", "mode"), [("gradops", "sequential"), ("mgda", "batched"),
                                            ("upgrad", "gramian"), ("db_mtl", "sequential"),
                                            ("mgda_ub", "sequential"), ("uw", "sequential")])
def test_bf16_update_agrees_with_float32(name, mode):
    """The same step with and without autocast: the shared update and the weights agree to
    bfloat16 accuracy (8-bit mantissas in the forward and backward passes)."""
    grads = []
    weights = []
    for dtype in (BF16, None):
        net, x, y = make(2, conv=True)
        if mode == "gramian":
            deconflict.track(net.trunk)
        z, losses = task_losses(net, x, y, dtype)
        record = deconflict.backward(losses, net.trunk, method(name), mode=mode,
                                     **features_for(name, z))
        grads.append(flat_grads(net.trunk.parameters()))
        weights.append(record.weights)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99
    if weights[0] is not None:
        torch.testing.assert_close(weights[0], weights[1], rtol=0.05, atol=0.02)


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_gramian_under_autocast_is_the_float64_gramian_of_autograds_gradients(mode):
    """M = J J^T accumulated in float64 from the float32 parameter gradients that autograd
    gives under the bfloat16 forward pass: equal to a float64 product of the same gradients to
    float64 rounding, far below the float32 product's error."""
    net, x, y = make(3, conv=True)
    _, losses = task_losses(net, x, y)
    shared = list(net.trunk.parameters())
    J = manual_jacobian(losses, shared).double()  # autograd's per-task gradients, exactly
    record = deconflict.backward(losses, net.trunk, "gradops", mode=mode)
    reference = J @ J.T
    torch.testing.assert_close(record.gramian, reference, rtol=1e-13, atol=0)
    float32_product = (J.float() @ J.float().T).double()
    assert not torch.allclose(float32_product, reference, rtol=1e-13, atol=0)


def test_gramian_on_bf16_features_is_float64():
    """Representation mode: the rows are bfloat16 feature gradients; their Gramian is exact."""
    net, x, y = make(4)
    z, losses = task_losses(net, x, y)
    assert z.dtype == BF16
    rows = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1)
                        for loss in losses])
    assert rows.dtype == BF16
    record = deconflict.backward(losses, net.trunk, "mgda_ub", features=z)
    torch.testing.assert_close(record.gramian, rows.double() @ rows.double().T, rtol=1e-13,
                               atol=0)


def test_gramian_mode_under_autocast_agrees_with_sequential():
    """The Linear rule's exact products D_i^T X versus autograd's bfloat16-rounded weight
    gradients: equal to bfloat16 rounding."""
    records = []
    for mode in ("sequential", "gramian"):
        net, x, y = make(5, conv=True)
        if mode == "gramian":
            deconflict.track(net.trunk)
        _, losses = task_losses(net, x, y)
        records.append(deconflict.backward(losses, net.trunk, "gradops", mode=mode))
    sequential, gramian = records
    scale = sequential.gramian.diagonal().max()
    torch.testing.assert_close(gramian.gramian / scale, sequential.gramian / scale, rtol=0,
                               atol=2e-3)


@pytest.mark.parametrize("name", ["gradops", "db_mtl", "uw"])
def test_backward_inside_or_outside_autocast_is_the_same(name):
    grads = []
    for inside in (False, True):
        net, x, y = make(6)
        train_step(net, x, y, method(name), inside=inside, lr=0.0)
        grads.append(flat_grads(net.parameters()))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------- GradScaler
SCALER_CASES = [("gradops", "sequential"), ("mgda", "batched"), ("upgrad", "gramian"),
                ("uw", "sequential"), ("uw", "gramian"), ("gradnorm", "sequential"),
                ("db_mtl", "sequential"), ("mgda_ub", "sequential"), ("graddrop", "sequential")]


def scaler(init_scale: float = 2.0**16, **options) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=init_scale, **options)


@pytest.mark.parametrize(("name", "mode"), SCALER_CASES)
def test_scaled_step_equals_the_unscaled_step(name, mode):
    """Powers of two scale exactly: the method sees the same Gramian and losses, and the
    parameters after scaler.step equal those of a plain step, bit for bit."""
    results = []
    for grad_scaler in (None, scaler()):
        net, x, y = make(7)
        if mode == "gramian":
            deconflict.track(net.trunk)
        record = train_step(net, x, y, method(name), mode=mode, scaler=grad_scaler)
        results.append((flat_params(net), record))
    (plain, plain_record), (scaled, scaled_record) = results
    torch.testing.assert_close(scaled, plain, rtol=0, atol=0)
    for field in ("losses", "gramian", "weights", "update_products", "layer_gramians"):
        torch.testing.assert_close(getattr(scaled_record, field), getattr(plain_record, field),
                                   rtol=0, atol=0)


@pytest.mark.parametrize(("name", "mode"), SCALER_CASES)
def test_scaled_grad_is_s_times_the_update(name, mode):
    """What scaler.step expects: every .grad (shared and heads) is s times the unscaled one."""
    grads = []
    for grad_scaler in (None, scaler(2.0**10)):
        net, x, y = make(8)
        if mode == "gramian":
            deconflict.track(net.trunk)
        z, losses = task_losses(net, x, y)
        deconflict.backward(losses, net.trunk, method(name), mode=mode, scaler=grad_scaler,
                            **features_for(name, z))
        grads.append(flat_grads(net.parameters()))
    torch.testing.assert_close(grads[1], 2.0**10 * grads[0], rtol=1e-6, atol=0)


def test_scaler_with_bfloat16_parameters():
    """A bfloat16 model (no autocast): the update is rounded once into bfloat16 .grad, with or
    without the power-of-two scale, so both steps give the same parameters."""
    params = []
    for grad_scaler in (None, scaler()):
        net, x, y = make(14)
        net.bfloat16()
        record = train_step(net, x.bfloat16(), y.bfloat16(), method("gradops"),
                            scaler=grad_scaler, dtype=None)
        assert not record.skipped and net.trunk[0].weight.grad.dtype == BF16
        params.append(flat_params(net))
    torch.testing.assert_close(params[1], params[0], rtol=0, atol=0)


def test_scaler_keeps_float16_gradients_from_underflowing():
    """float16 autocast and small losses: unscaled, most gradient elements flush to zero; with
    the scaler the Gramian is the float32 one to float16 accuracy."""
    records = {}
    for label, dtype, grad_scaler in [("float32", None, None), ("fp16", torch.float16, None),
                                      ("fp16+scaler", torch.float16, scaler())]:
        net, x, y = make(9)
        _, losses = task_losses(net, x, y, dtype)
        losses = [1e-6 * loss for loss in losses]
        records[label] = deconflict.backward(losses, net.trunk, "gradops", scaler=grad_scaler)
    reference = records["float32"].gramian
    relative = {label: float((record.gramian - reference).abs().max() / reference.abs().max())
                for label, record in records.items()}
    assert relative["fp16+scaler"] < 0.02
    assert relative["fp16"] > 0.1


@pytest.mark.parametrize(("name", "mode"), [*SCALER_CASES, ("famo", "sequential")])
def test_overflow_skips_the_step_and_lowers_the_scale(name, mode):
    """A scale of 2^127 overflows float32 gradients: no error, no parameter changes (shared and
    heads), a lower scale after update(), a record that says so; the next step runs."""
    net, x, y = make(10, scale=100.0)  # targets far from the outputs: gradients above 2
    if mode == "gramian":
        deconflict.track(net.trunk)
    m = method(name)
    grad_scaler = scaler(2.0**127, backoff_factor=2.0**-110)
    before = flat_params(net)
    state = copy.deepcopy(m.state_dict())
    record = train_step(net, x, y, m, mode=mode, scaler=grad_scaler)
    assert record.skipped and record.weights is None
    assert "NaN or infinity" in record.diagnostics["overflow"]
    assert deconflict.ConflictMonitor(m).observe(record) is None  # nothing to measure
    assert torch.equal(flat_params(net), before)
    assert grad_scaler.get_scale() == 2.0**17
    assert same_state(m.state_dict(), state)  # a skipped step leaves the method as it was

    record = train_step(net, x, y, m, mode=mode, scaler=grad_scaler)
    assert not record.skipped
    assert torch.isfinite(flat_params(net)).all() and not torch.equal(flat_params(net), before)
    assert grad_scaler.get_scale() == 2.0**17


def test_overflow_found_after_the_method_ran_restores_its_state():
    """Tiny head weights: the shared gradients stay finite at a scale where the heads' overflow,
    which shows only after the method (GradVac, whose targets move every step) ran."""
    net, x, y = make(13, scale=100.0)
    with torch.no_grad():
        for head in net.heads:
            head.weight.mul_(1e-6)
    m = method("gradvac")
    train_step(net, x, y, m, lr=0.0)
    _, losses = task_losses(net, x, y)
    heads = list(net.heads.parameters())
    head_max = max(g.abs().max() for g in torch.autograd.grad(sum(losses), heads,
                                                              retain_graph=True))
    exponent = math.ceil(math.log2(torch.finfo(torch.float32).max / head_max))
    shared_norms = manual_jacobian(losses, list(net.trunk.parameters())).double().norm(dim=1)
    assert 2.0**exponent * shared_norms.sum() < 1e-3 * torch.finfo(torch.float32).max
    state = copy.deepcopy(m.state_dict())
    moved = copy.deepcopy(m)
    train_step(copy.deepcopy(net), x, y, moved, lr=0.0)
    assert not same_state(moved.state_dict(), state)

    record = train_step(net, x, y, m, scaler=scaler(2.0**exponent))
    assert record.skipped and "task-specific parameter" in record.diagnostics["overflow"]
    assert same_state(m.state_dict(), state)


@pytest.mark.parametrize("mode", ["sequential", "gramian"])
def test_non_finite_loss_with_a_scaler_skips_the_step(mode):
    """An overflow in the forward pass (an infinite loss) is the scaler's case too: it skips,
    as scaler.scale(loss).backward() would; without a scaler it is an error."""
    net, x, y = make(11)
    if mode == "gramian":
        deconflict.track(net.trunk)
    grad_scaler = scaler()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    before = flat_params(net)
    _, losses = task_losses(net, x, y)
    losses[1] = losses[1] * float("inf")
    record = deconflict.backward(losses, net.trunk, "gradops", mode=mode, scaler=grad_scaler)
    assert record.skipped and "loss 1 is inf" in record.diagnostics["overflow"]
    grad_scaler.step(optimizer)
    grad_scaler.update()
    assert torch.equal(flat_params(net), before) and grad_scaler.get_scale() == 2.0**15
    if mode == "gramian":
        assert not deconflict.track(net.trunk).calls  # the records of the skipped step are gone
    _, losses = task_losses(net, x, y)
    losses[1] = losses[1] * float("inf")
    with pytest.raises(deconflict.NonFiniteError, match="loss 1 is inf"):
        deconflict.backward(losses, net.trunk, "gradops", mode=mode)


def test_disabled_scaler_is_no_scaler():
    grads = []
    for grad_scaler in (None, scaler(enabled=False)):
        net, x, y = make(12)
        _, losses = task_losses(net, x, y)
        deconflict.backward(losses, net.trunk, "pcgrad", scaler=grad_scaler)
        grads.append(flat_grads(net.parameters()))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    _, losses = task_losses(net, x, y)
    with pytest.raises(deconflict.NonFiniteError, match="loss 0 is inf"):
        deconflict.backward([float("inf") * losses[0], *losses[1:]], net.trunk, "gradops",
                            scaler=scaler(enabled=False))
