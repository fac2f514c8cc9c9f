"""Recon's surgery (deconflict.recon.branch): per-task copies of chosen trunk layers."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import Tensor, nn

from deconflict import InvalidOptionError, UnsupportedModelError
from deconflict.recon import BranchedModule, branch
from deconflict.recon.branch import TaskTrunk


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(),
    )


class ConvEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.latent = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.latent(self.features(x))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.layer1 = nn.Linear(4, 4)
        self.layer2 = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        return h + self.layer2(torch.relu(self.layer1(h)))


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 6))
        self.norm = nn.LayerNorm(6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.body(x))


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.mid(torch.tanh(self.stem(x))))
        return h, self.head(h)


class DictOut(TupleOut):
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h, logits = super().forward(x)
        return {"features": h, "logits": logits}


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.layer(x)
        return x


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(x)
        return nn.functional.linear(h, self.layer.weight)


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.spare = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class AugmentedAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.layer = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h += self.layer(h)  # fx records h = h + ..., so each stream gets its own sum
        return h


class InPlace(AugmentedAdd):
    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        return h.add_(self.layer(h))


# (model factory, input shape, names to branch, expected branched leaves, a prefix module or None)
CASES = {
    "mlp-middle": (mlp, (5, 4), ["2"], ("2",), "0"),
    "mlp-first": (mlp, (5, 4), ["0"], ("0",), None),
    "mlp-two": (mlp, (5, 4), ["4", "0"], ("0", "4"), None),
    "conv-latent": (ConvEncoder, (3, 1, 8, 8), ["latent.1"], ("latent.1",), "features.0"),
    "conv-container": (
        ConvEncoder, (3, 1, 8, 8), ["features", "features.0"], ("features.0",), None,
    ),
    "residual": (Residual, (5, 4), ["layer1"], ("layer1",), "stem"),
    "normed": (Normed, (5, 4), ["body.1", "norm"], ("body.1", "norm"), "body.0"),
    "tuple": (TupleOut, (5, 4), ["mid"], ("mid",), "stem"),
    "dict": (DictOut, (5, 4), ["mid", "mid"], ("mid",), "stem"),
}


def build(case: str, num_tasks: int = 3) -> tuple[nn.Module, BranchedModule, Tensor]:
    factory, shape, names, _, _ = CASES[case]
    torch.manual_seed(0)
    original = factory().eval()
    return original, branch(original, names, num_tasks).eval(), torch.randn(shape)


def tensors(output: object) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output
    return [t for value in values for t in tensors(value)]


def numel(parameters: object) -> int:
    return sum(p.numel() for p in parameters)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_each_stream_computes_the_original(case: str, num_tasks: int) -> None:
    original, branched, x = build(case, num_tasks)
    out = branched(x)
    assert isinstance(out, tuple) and len(out) == num_tasks
    expected = original(x)
    for task_out in out:
        assert type(task_out) is type(expected)
        torch.testing.assert_close(task_out, expected, rtol=0, atol=1e-6)
    assert branched.layer_names == CASES[case][3]
    assert branched.num_tasks == num_tasks


@pytest.mark.parametrize("case", CASES)
def test_a_task_loss_reaches_only_its_copies_and_every_shared_parameter(case: str) -> None:
    _, branched, x = build(case)
    branched.train()
    for task in range(branched.num_tasks):
        branched.zero_grad(set_to_none=True)
        sum(t.square().sum() for t in tensors(branched(x)[task])).backward()
        for other in range(branched.num_tasks):
            for name, p in branched.task_parameters(other):
                if other == task:
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
                else:
                    assert p.grad is None or not p.grad.any(), name
        for name, p in branched.shared_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_parameter_count_and_partition(case: str, num_tasks: int) -> None:
    original, branched, _ = build(case, num_tasks)
    copied = sum(numel(original.get_submodule(n).parameters()) for n in CASES[case][3])
    total = numel(branched.parameters())
    assert total == numel(original.parameters()) + (num_tasks - 1) * copied
    shared = [p for _, p in branched.shared_parameters()]
    per_task = [[p for _, p in branched.task_parameters(t)] for t in range(num_tasks)]
    assert all(numel(ps) == copied for ps in per_task)
    groups = [shared, *per_task]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids)) == len(list(branched.parameters()))
    assert set(ids) == {id(p) for p in branched.parameters()}
    # shared parameters keep the original trunk's names (per-layer reports match); every name
    # indexes the rewritten trunk
    names = [n for n, _ in branched.shared_parameters()]
    branched_layers = CASES[case][3]
    assert set(names) == {n for n, _ in original.named_parameters()
                          if not any(n.startswith(layer + ".") for layer in branched_layers)}
    names += [n for t in range(num_tasks) for n, _ in branched.task_parameters(t)]
    assert set(names) == {n for n, _ in branched.trunk.named_parameters()}


@pytest.mark.parametrize("case", ["mlp-middle", "conv-container", "normed"])
def test_the_original_is_left_alone(case: str) -> None:
    original, branched, x = build(case)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    expected = original(x)
    assert not {id(p) for p in original.parameters()} & {id(p) for p in branched.parameters()}
    with torch.no_grad():
        for p in branched.parameters():
            p.add_(1.0)
    branched.train()(x)  # updates the copies' BatchNorm statistics, not the original's
    after = original.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(original(x), expected, rtol=0, atol=0)


def test_copies_keep_their_own_buffers() -> None:
    torch.manual_seed(0)
    original = Normed()
    branched = branch(original, ["body.0", "body.1"], 2)
    norms = list(branched.branches["body_1"])
    assert norms[0].running_mean is not norms[1].running_mean
    buffers = sum(1 for _ in branched.buffers())
    assert buffers == sum(1 for _ in original.buffers()) + len(list(norms[0].buffers()))
    branched.reset_branches()
    x = torch.randn(5, 4)
    branched.train()(x)
    # each copy saw its own stream: running mean = momentum * batch mean, from zero
    for linear, norm in zip(branched.branches["body_0"], norms, strict=True):
        expected = norm.momentum * linear(x).mean(0)
        torch.testing.assert_close(norm.running_mean, expected.detach())
    assert not torch.allclose(norms[0].running_mean, norms[1].running_mean)
    assert not original.body[1].running_mean.any()


@pytest.mark.parametrize("case", ["mlp-two", "conv-latent", "conv-container", "residual"])
def test_reset_branches_separates_copies_and_keeps_shared(case: str) -> None:
    _, branched, x = build(case)
    shared = {n: p.detach().clone() for n, p in branched.shared_parameters()}
    branched.reset_branches()
    for n, p in branched.shared_parameters():
        assert torch.equal(p, shared[n]), n
    weights = [dict(branched.task_parameters(t)) for t in range(branched.num_tasks)]
    for t in range(1, branched.num_tasks):
        for (n0, p0), p in zip(weights[0].items(), weights[t].values(), strict=True):
            if n0.endswith("weight"):
                assert not torch.equal(p0, p), n0
    out = branched(x)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] is not None])
def test_the_prefix_runs_once(case: str) -> None:
    _, branched, x = build(case)
    calls = []
    branched.trunk.get_submodule(CASES[case][4]).register_forward_hook(
        lambda *_: calls.append(1)
    )
    branched(x)
    assert len(calls) == 1
    branched(x)
    assert len(calls) == 2


def test_the_residual_add_is_per_task() -> None:
    _, branched, x = build("residual")
    branched.reset_branches()
    stem, layer2 = branched.trunk.stem, branched.trunk.layer2
    out = branched(x)
    for t, layer1 in enumerate(branched.branches["layer1"]):
        h = stem(x)
        torch.testing.assert_close(out[t], h + layer2(torch.relu(layer1(h))))


def test_a_layer_called_twice_calls_its_copy_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.layer(torch.tanh(self.layer(x)))

    torch.manual_seed(0)
    branched = branch(Twice(), "layer", 2)
    branched.reset_branches()
    x = torch.randn(3, 4)
    out = branched(x)
    for t, layer in enumerate(branched.branches["layer"]):
        torch.testing.assert_close(out[t], layer(torch.tanh(layer(x))))


def test_state_dict_round_trip() -> None:
    original, first, x = build("normed")
    second = branch(original, CASES["normed"][2], 3).eval()
    first.reset_branches()
    first.train()(x)  # moves the BatchNorm statistics too
    first.eval()
    assert not torch.allclose(first(x)[0], second(x)[0])
    second.load_state_dict(first.state_dict())
    for a, b in zip(first(x), second(x), strict=True):
        assert torch.equal(a, b)
    restored = pickle.loads(pickle.dumps(first))
    for a, b in zip(first(x), restored(x), strict=True):
        assert torch.equal(a, b)


def test_an_augmented_assignment_onto_the_prefix_is_per_task() -> None:
    torch.manual_seed(0)
    original = AugmentedAdd()
    x = torch.randn(3, 4)
    expected = original(x)
    for out in branch(original, ["layer"], 2)(x):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_keyword_inputs_pass_through() -> None:
    original, branched, x = build("mlp-middle")
    (out, *_) = branched(input=x)
    torch.testing.assert_close(out, original(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "names", "match"),
    [
        (mlp, ["7"], r"'7' is not a submodule of Sequential; valid names include '0', '1'"),
        (ConvEncoder, ["latent.2x"], r"did you mean 'latent.2'"),
        (mlp, ["1"], r"'1' \(ReLU\) owns no parameters"),
        (Unused, ["spare"], r"'spare' \(Linear\) is never called"),
        (DataDependent, ["layer"], r"could not trace DataDependent.*control flow.*nn.Sequential"),
        (Tied, ["layer"], r"branched layer 'layer' is read directly as 'layer.weight'.*tied"),
        (InPlace, ["layer"], r"in-place operation .*add_.*'stem'"),
    ],
)
def test_unsupported_models_are_named(model: type, names: list[str], match: str) -> None:
    with pytest.raises(UnsupportedModelError, match=match):
        branch(model(), names, 2)


def test_a_layer_inside_a_whole_torch_module_names_the_enclosing_one() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.block(x)

    with pytest.raises(UnsupportedModelError, match=r"inside 'block'.*branch 'block' instead"):
        branch(Encoder(), ["block.linear1"], 2)


def test_bad_options() -> None:
    with pytest.raises(InvalidOptionError, match="num_tasks must be at least 1"):
        branch(mlp(), ["0"], 0)
    with pytest.raises(InvalidOptionError, match="layer_names is empty"):
        branch(mlp(), [], 2)
    with pytest.raises(InvalidOptionError, match=r"task must be in \[0, 2\)"):
        next(branch(mlp(), ["0"], 2).task_parameters(2))


def test_unsupported_model_error_is_a_value_error() -> None:
    assert issubclass(UnsupportedModelError, ValueError)


# ----------------------------------------------------------------- trunks with task outputs
class TwoTaskTrunk(TaskTrunk):
    """A shared stem, a shared middle layer, and one gate per task (task-specific) on it."""

    task_specific = ("gates",)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.middle = nn.Linear(6, 6)
        self.gates = nn.ModuleList(nn.Linear(6, 3) for _ in range(2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.middle(torch.tanh(self.stem(x))))
        return self.gates[0](h), self.gates[1](h)


def test_a_task_trunk_keeps_its_output_and_each_stream_computes_its_entry_only():
    torch.manual_seed(0)
    original = TwoTaskTrunk()
    branched = branch(original, ["middle"], 2)
    x = torch.randn(5, 4)
    out = branched(x)
    expected = original(x)
    assert isinstance(out, tuple) and len(out) == 2
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Stream t calls its copy of the middle layer and only task t's gate: 2 gate calls, not 4.
    calls: list[str] = []
    for t in range(2):
        branched.trunk.get_submodule(f"gates.{t}").register_forward_hook(
            lambda *_, t=t: calls.append(f"g{t}"))
        branched.branches["middle"][t].register_forward_hook(
            lambda *_, t=t: calls.append(f"m{t}"))
    branched(x)
    assert sorted(calls) == ["g0", "g1", "m0", "m1"]
    branched.reset_branches()
    for t in range(2):
        h = torch.tanh(branched.branches["middle"][t](torch.tanh(branched.trunk.stem(x))))
        torch.testing.assert_close(branched(x)[t], branched.trunk.get_submodule(f"gates.{t}")(h))


def test_a_task_trunks_task_specific_modules_are_not_shared_nor_branchable():
    original = TwoTaskTrunk()
    assert [n for n, _ in original.shared_parameters()] == [
        "stem.weight", "stem.bias", "middle.weight", "middle.bias"]
    branched = branch(original, ["stem"], 2)
    assert [n for n, _ in branched.shared_parameters()] == ["middle.weight", "middle.bias"]
    assert branched.task_specific == ("gates",)
    with pytest.raises(UnsupportedModelError, match=r"'gates\.1' .*is or holds the "
                       r"task-specific module 'gates'"):
        branch(original, ["gates.1"], 2)


def test_a_task_trunk_must_return_one_entry_per_task():
    class Three(TwoTaskTrunk):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            a, b = super().forward(x)
            return a, b, a + b  # type: ignore[return-value]

    with pytest.raises(UnsupportedModelError, match=r"one entry per task \(2\); it returns "
                       r"tuple of 3"):
        branch(Three(), ["middle"], 2)
