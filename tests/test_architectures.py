"""The multi-task architectures of experiments.models (MMoE, DSelect-k, CGC, PLE, cross-stitch):
shapes and parameter counts against hand-computed formulas, which parameters every task's loss
reaches (the declared shared parameters, checked against autograd), the DSelect-k gate's
properties, Recon's branch on each, and smoke runs through the CLI on census-income."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch
from interrupt import KilledError, save_then_die
from torch import nn

import deconflict
from deconflict.cli import main
from deconflict.experiments import problems  # noqa: F401 - before models: they import each other
from deconflict.experiments.models import (
    CGC,
    PLE,
    CrossStitch,
    DSelectK,
    DSelectKGate,
    Experts,
    MMoE,
    smooth_step,
)
from deconflict.experiments.problems import get_problem
from deconflict.recon import BranchedModule, branch

TASKS = {"a": 1, "b": 1, "c": 2}
INPUTS, HIDDEN, TOWER = 6, [8, 5], 16


def linear(a: int, b: int) -> int:
    return a * b + b


def mlp_count(sizes: list[int]) -> int:
    return sum(linear(a, b) for a, b in itertools.pairwise(sizes))


def expert_count(inputs: int) -> int:
    return mlp_count([inputs, *HIDDEN])


def tower_count(n: int) -> int:
    return mlp_count([HIDDEN[-1], TOWER, n])


def numel(parameters) -> int:
    return sum(p.numel() for p in parameters)


# (factory, shared parameters by formula, total by formula); T = 3 tasks, outputs 1, 1, 2.
def _mmoe_counts(n: int, gate: int) -> tuple[int, int]:
    shared = n * expert_count(INPUTS)
    return shared, shared + 3 * gate + sum(tower_count(k) for k in TASKS.values())


def _ple_counts(shared_experts: int, task_experts: int, levels: int) -> tuple[int, int]:
    # Level 0 reads the 6 inputs, later levels the experts' 5 units.
    widths = [INPUTS] + [HIDDEN[-1]] * (levels - 1)
    total = shared = 0
    for level, w in enumerate(widths):
        level_shared = shared_experts * expert_count(w)
        level_tasks = 3 * task_experts * expert_count(w)
        task_gates = 3 * linear(w, task_experts + shared_experts)
        shared_gate = linear(w, 3 * task_experts + shared_experts) if level < levels - 1 else 0
        total += level_shared + level_tasks + task_gates + shared_gate
        shared += level_shared + shared_gate
        if level < levels - 1:
            shared += level_tasks  # they feed the shared gate, hence every task
        if level < levels - 2:
            shared += task_gates  # into the next level's task experts, hence its shared gate
    return shared, total + sum(tower_count(k) for k in TASKS.values())


def _cross_stitch_counts() -> tuple[int, int]:
    towers = 3 * mlp_count([INPUTS, *HIDDEN])
    units = len(HIDDEN) * 3 * 3
    heads = sum(linear(HIDDEN[-1], k) for k in TASKS.values())
    return towers + units, towers + units + heads


# DSelect-k gate: k = 2 selectors, n = 4 experts -> m = 2 bits: z = Linear(6, 2 * 2), w =
# Linear(6, 2).
MODELS = {
    "mmoe": (lambda: MMoE(INPUTS, 4, HIDDEN, TASKS, tower=TOWER), _mmoe_counts(4, linear(6, 4))),
    "dselect_k": (lambda: DSelectK(INPUTS, 4, HIDDEN, TASKS, tower=TOWER, k=2),
                  _mmoe_counts(4, linear(6, 4) + linear(6, 2))),
    "cgc": (lambda: CGC(INPUTS, TASKS, 2, 1, HIDDEN, tower=TOWER), _ple_counts(2, 1, 1)),
    "ple2": (lambda: PLE(INPUTS, TASKS, 2, 1, HIDDEN, levels=2, tower=TOWER),
             _ple_counts(2, 1, 2)),
    "ple3": (lambda: PLE(INPUTS, TASKS, 2, 2, HIDDEN, levels=3, tower=TOWER),
             _ple_counts(2, 2, 3)),
    "cross_stitch": (lambda: CrossStitch(INPUTS, HIDDEN, TASKS), _cross_stitch_counts()),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]()


def task_losses(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    _, outputs = model(x)
    return [outputs[t].square().mean() for t in TASKS]


def reached(loss: torch.Tensor, model: nn.Module) -> set[str]:
    """The parameters in ``loss``'s autograd graph (whatever their gradient's value)."""
    names, parameters = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return {n for n, g in zip(names, grads, strict=True) if g is not None}


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_parameter_counts_match_the_formulas(name):
    model = build(name)
    z, outputs = model(torch.randn(7, INPUTS))
    assert {t: tuple(o.shape) for t, o in outputs.items()} == {t: (7, n)
                                                              for t, n in TASKS.items()}
    assert z.shape[0] == 7 and z.shape[-1] == HIDDEN[-1]
    shared, total = MODELS[name][1]
    assert numel(model.parameters()) == total
    assert numel(p for _, p in model.shared_parameters()) == shared


@pytest.mark.parametrize("name", MODELS)
def test_the_declared_shared_parameters_are_those_every_task_reaches(name):
    model = build(name)
    losses = task_losses(model, torch.randn(9, INPUTS))
    per_task = [reached(loss, model) for loss in losses]
    every = set.intersection(*per_task)
    declared = {f"shared.{n}" for n, _ in model.shared_parameters()}
    assert declared == every
    # Whatever is not shared is reached by exactly one task (its gate, experts, tower, head).
    for parameter in set.union(*per_task) - every:
        assert sum(parameter in r for r in per_task) == 1, parameter
    assert set.union(*per_task) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_each_task_backward_reaches_every_shared_expert_and_its_own_gate(name):
    model = build(name)
    x = torch.randn(9, INPUTS)
    shared = {n for n, _ in model.shared_parameters()}
    for t, task in enumerate(TASKS):
        model.zero_grad(set_to_none=True)
        task_losses(model, x)[t].backward()
        for n, p in model.shared.named_parameters():
            if n in shared:
                assert p.grad is not None and p.grad.abs().sum() > 0, (task, n)
        own = [n for n, _ in model.named_parameters()
               if f".{task}." in f".{n}." and not n.startswith("shared.towers.")]
        assert own
        for n in own:
            assert dict(model.named_parameters())[n].grad.abs().sum() > 0, (task, n)


def test_expert_and_gate_modules_are_where_the_docs_say():
    mmoe = build("mmoe")
    assert isinstance(mmoe.shared, Experts) and len(mmoe.shared) == 4
    ple = build("ple2")
    # The last level's task experts and gates and the level below's task gates are per task.
    assert set(ple.shared.task_specific) == {
        *(f"task_experts.1.{t}" for t in TASKS), *(f"task_gates.1.{t}" for t in TASKS),
        *(f"task_gates.0.{t}" for t in TASKS)}
    assert build("cross_stitch").shared.task_specific == ()


# ------------------------------------------------------------------------------ DSelect-k
def test_smooth_step_by_hand_and_its_derivative_is_continuous():
    gamma = 2.0
    t = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], dtype=torch.float64,
                     requires_grad=True)
    # -2 t^3 / 8 + 3 t / 4 + 1/2 at t = 0.5: -1/32 + 3/8 + 1/2 = 27/32.
    values = smooth_step(t, gamma)
    expected = [0.0, 0.0, 5 / 32, 0.5, 27 / 32, 1.0, 1.0]
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float64))
    (slope,) = torch.autograd.grad(values.sum(), t)
    # S'(t) = -6 t^2 / gamma^3 + 3 / (2 gamma): 0 at the band's edges, 3/4 at 0.
    torch.testing.assert_close(slope, torch.tensor([0, 0, 0.5625, 0.75, 0.5625, 0, 0],
                                                   dtype=torch.float64))


@pytest.mark.parametrize("experts", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_dselect_k_gate_is_a_distribution_over_the_experts(experts, scale):
    torch.manual_seed(experts)
    gate = DSelectKGate(6, experts, k=3, gamma=1.0)
    with torch.no_grad():
        gate.selectors.weight.mul_(scale * 100)  # from the smooth band to fully binary
    weights = gate(torch.randn(50, 6))
    assert weights.shape == (50, experts) and bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(50), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("experts", "k"), [(4, 1), (4, 2), (8, 3), (5, 2), (3, 2)])
def test_dselect_k_selects_at_most_k_experts_once_binary(experts, k):
    torch.manual_seed(0)
    gate = DSelectKGate(6, experts, k=k)
    with torch.no_grad():
        gate.selectors.weight.normal_().mul_(1e3)  # every |z| >> gamma / 2 (almost surely)
    x = torch.randn(200, 6)
    # The examples whose every z is outside the smooth band (nearly all at this scale).
    binary = (gate.selectors(x).abs() >= gate.gamma / 2).all(dim=-1)
    assert int(binary.sum()) >= 150
    weights = gate(x[binary])
    assert int((weights > 0).sum(-1).max()) <= k
    assert int((weights > 0).sum(-1).min()) >= 1


def test_dselect_k_binary_gate_by_hand():
    # n = 3 experts, m = 2 bits, k = 2. Selector 1's bits (1, 0) -> code 2 -> expert 2;
    # selector 2's bits (1, 1) -> code 3 -> expert 3 mod 3 = 0. Mixing logits (0, log 3):
    # softmax (1/4, 3/4), so the gate is 3/4 on expert 0 and 1/4 on expert 2.
    gate = DSelectKGate(2, 3, k=2, gamma=1.0)
    with torch.no_grad():
        gate.selectors.weight.zero_()
        gate.selectors.bias.copy_(torch.tensor([5.0, -5.0, 5.0, 5.0]))
        gate.weights.weight.zero_()
        gate.weights.bias.copy_(torch.tensor([0.0, torch.log(torch.tensor(3.0))]))
    weights = gate(torch.randn(4, 2))
    torch.testing.assert_close(weights, torch.tensor([[0.75, 0.0, 0.25]]).expand(4, 3))


def test_dselect_k_starts_in_the_smooth_band_as_in_the_authors_code():
    gate = DSelectKGate(6, 8, k=2, gamma=1.0)
    assert gate.selectors.weight.abs().max() <= 0.01 and gate.weights.weight.abs().max() <= 0.05
    with pytest.raises(ValueError, match="gamma > 0"):
        DSelectKGate(6, 8, k=2, gamma=0.0)


# ---------------------------------------------------------------------------- cross-stitch
def test_cross_stitch_units_start_at_the_papers_initialization_and_mix():
    model = build("cross_stitch")
    alpha = model.shared.stitches[0].alpha
    torch.testing.assert_close(alpha, torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05],
                                                    [0.05, 0.05, 0.9]]))
    # With identity units the towers are independent: task a's loss reaches tower a only.
    with torch.no_grad():
        for stitch in model.shared.stitches:
            stitch.alpha.copy_(torch.eye(3))
    loss = task_losses(model, torch.randn(5, INPUTS))[0]
    names, parameters = zip(*model.shared.towers.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    for n, g in zip(names, grads, strict=True):
        assert (g is not None and g.abs().sum() > 0) == n.startswith("a."), n


# --------------------------------------------------------------------------------- Recon
# (model, layers to branch): a shared expert layer, or a tower layer and a unit.
BRANCH = {
    "mmoe": ["1.2"], "dselect_k": ["0.0", "3.2"], "cgc": ["shared_experts.0.1.2"],
    "ple2": ["shared_experts.1.0.0", "task_experts.0.b.0.2", "shared_gates.0"],
    "ple3": ["task_gates.0.a"], "cross_stitch": ["towers.c.1.0", "stitches.0"],
}


@pytest.mark.parametrize("name", BRANCH)
def test_branch_splits_the_shared_layers_of_every_architecture(name):
    model = build(name).eval()
    x = torch.randn(6, INPUTS)
    expected = model(x)[1]
    shared_before = numel(p for _, p in model.shared_parameters())
    total_before = numel(model.parameters())
    copied = numel(p for layer in BRANCH[name]
                   for p in model.shared.get_submodule(layer).parameters())
    model.shared = branch(model.shared, BRANCH[name], len(TASKS))
    # The copies start from the original weights: the same function.
    for task, out in model(x)[1].items():
        torch.testing.assert_close(out, expected[task], rtol=0, atol=1e-6)
    assert numel(model.parameters()) == total_before + (len(TASKS) - 1) * copied
    assert numel(p for _, p in model.shared_parameters()) == shared_before - copied
    model.shared.reset_branches()
    model.train()
    shared = {id(p) for _, p in model.shared_parameters()}
    for t in range(len(TASKS)):
        model.zero_grad(set_to_none=True)
        task_losses(model, x)[t].backward()
        for other in range(len(TASKS)):
            for n, p in model.shared.task_parameters(other):
                touched = p.grad is not None and bool(p.grad.any())
                assert touched == (other == t), (t, n)
        for n, p in model.named_parameters():
            if id(p) in shared:
                assert p.grad is not None and p.grad.abs().sum() > 0, (t, n)


def test_a_branched_task_trunk_computes_each_tasks_path_once():
    model = build("ple2")
    model.shared = branch(model.shared, ["shared_experts.0.0.0"], len(TASKS))
    calls = []
    for task in TASKS:  # the last level's gates: one task's path each
        model.shared.trunk.get_submodule(f"task_gates.1.{task}").register_forward_hook(
            lambda *_, task=task: calls.append(task))
    model(torch.randn(3, INPUTS))
    assert sorted(calls) == sorted(TASKS)


def test_task_specific_modules_cannot_be_branched():
    model = build("ple2")
    with pytest.raises(deconflict.UnsupportedModelError, match=r"task-specific module "
                       r"'task_experts\.1\.a'"):
        branch(model.shared, ["task_experts.1.a.0.0"], len(TASKS))


# --------------------------------------------------------------------- census-income runs
CENSUS_MODELS = ("mmoe", "dselect_k", "cgc", "ple", "cross_stitch")


@pytest.mark.parametrize("model", CENSUS_MODELS)
def test_census_income_smoke_run_through_the_cli(model, census_data, tmp_path):
    out = tmp_path / "out"
    started = time.perf_counter()
    assert main(["run", "census-income", "--method", "gradops", "--smoke", "--quiet",
                 "--out", str(out), "--set", f"model={model}"]) == 0
    seconds = time.perf_counter() - started
    (path,) = out.rglob("seed0-*.json")
    record = json.loads(path.read_text())
    assert record["config"]["model"] == model
    assert set(record["metrics"]["test"]) == {"auc_income", "auc_marital", "auc_education"}
    statistics = record["statistics"]
    assert 0 < statistics["shared_parameters"] < statistics["parameters"]
    assert statistics["strong_non_conflict_fraction"] == 1.0  # GradOPS on the shared ones
    assert seconds < 120  # a smoke run; typically well under 5 s


def test_census_branching_and_representation_rules(census_data):
    problem = get_problem("census-income")
    cpu = torch.device("cpu")
    config = problem.resolve_config({"model": "ple", "branch": ["shared_experts.1.0.0"]},
                                    smoke=True)
    model = problem.model_for(config, problem.tasks(config), problem.load(config), 0)
    assert isinstance(model.shared, BranchedModule)
    # Representation mode: the experts' stack for DSelect-k, refused where no tensor is shared.
    config = problem.resolve_config({"model": "dselect_k", "representation": True}, smoke=True)
    result = problem.train(lambda: deconflict.MGDA(), config, 0, cpu)
    assert result.statistics["measured_steps"] > 0
    for name in ("cgc", "ple", "cross_stitch"):
        config = problem.resolve_config({"model": name, "representation": True}, smoke=True)
        with pytest.raises(deconflict.InvalidOptionError, match="representation mode is not"):
            problem.train(lambda: deconflict.GradOPS(), config, 0, cpu)
        config["representation"] = False
        with pytest.raises(deconflict.InvalidOptionError, match="mgda_ub works on the shared"):
            problem.train(lambda: deconflict.MGDAUB(), config, 0, cpu)


def test_recon_command_on_ple(census_data, tmp_path):
    out = tmp_path / "out"
    assert main(["recon", "census-income", "--method", "sum", "--S", "0", "--topk", "1",
                 "--smoke", "--out", str(out), "--quiet", "--set", "model=ple"]) == 0
    (scores,) = out.rglob("scores.json")
    chosen = json.loads(scores.read_text())["branched"]
    assert len(chosen) == 1
    runs = [json.loads(p.read_text()) for p in (out / "census-income" / "runs").rglob("*.json")]
    branched = [r for r in runs if r["config"]["branch"] == chosen]
    plain = [r for r in runs if not r["config"]["branch"]]
    assert branched and plain
    assert (branched[0]["statistics"]["shared_parameters"]
            < plain[0]["statistics"]["shared_parameters"])


@pytest.mark.parametrize("model", ["mmoe", "dselect_k"])
def test_branched_experts_in_representation_mode(model, census_data):
    # Branched, the representation is one expert stack per task's stream (features=several).
    problem = get_problem("census-income")
    config = problem.resolve_config({"model": model, "branch": ["0.0"], "representation": True},
                                    smoke=True)
    result = problem.train(lambda: deconflict.MGDA(), config, 0, torch.device("cpu"))
    assert result.statistics["measured_steps"] > 0
    assert all(0.0 <= v <= 1.0 for v in result.metrics["test"].values())


# ------------------------------------------------------------------------ digits (issue 16)
# The architectures on the flattened 10 x 10 canvas of the digits problem, each task's tower
# replaced by the conv model's head: a linear classifier (left) and the MLP decoder to the 64
# pixels of the lower-right digit (right). Defaults: hidden [64, 32], 4 experts of [32, 16],
# 1 task expert, 2 levels, k = 2.
DIGIT_MODELS = ("shared_bottom", "mmoe", "dselect_k", "cgc", "ple", "cross_stitch")
PIXELS, DIGIT_HIDDEN, DIGIT_EXPERT = 100, [64, 32], [32, 16]


def digit_heads_count(width: int) -> int:
    return linear(width, 10) + linear(width, 128) + linear(128, 64)


def digit_counts(model: str) -> tuple[int, int]:
    """(shared, total) parameters by formula, T = 2 tasks."""
    expert = mlp_count([PIXELS, *DIGIT_EXPERT])
    if model in ("shared_bottom", "cross_stitch"):
        trunk = mlp_count([PIXELS, *DIGIT_HIDDEN])
        if model == "shared_bottom":
            return trunk, trunk + digit_heads_count(32)
        shared = 2 * trunk + len(DIGIT_HIDDEN) * 2 * 2  # two towers, a 2 x 2 unit per layer
        return shared, shared + digit_heads_count(32)
    heads = digit_heads_count(16)
    if model == "mmoe":
        return 4 * expert, 4 * expert + 2 * linear(PIXELS, 4) + heads
    if model == "dselect_k":  # 4 experts: 2 bits, k = 2 selectors
        return 4 * expert, 4 * expert + 2 * (linear(PIXELS, 4) + linear(PIXELS, 2)) + heads
    if model == "cgc":
        return 4 * expert, 4 * expert + 2 * expert + 2 * linear(PIXELS, 5) + heads
    # PLE, 2 levels: shared are level 0's experts (its task experts feed the shared gate) and
    # shared gate, and level 1's shared experts; level 0's task gates feed only their task's
    # level-1 experts, so they and level 1's task experts and gates are per task (Extraction).
    level0 = 4 * expert + 2 * expert + linear(PIXELS, 2 * 1 + 4)
    expert1 = mlp_count([16, *DIGIT_EXPERT])
    task_gates0 = 2 * linear(PIXELS, 5)
    level1 = 4 * expert1 + 2 * expert1 + 2 * linear(16, 5)
    return level0 + 4 * expert1, level0 + task_gates0 + level1 + heads


def digit_model(model: str, **overrides):
    problem = get_problem("digits")
    config = problem.resolve_config({"model": model, **overrides}, smoke=True)
    data = problem.load(config)
    torch.manual_seed(0)
    return problem.build_model(config, problem.tasks(config), data), data


def test_the_default_digits_records_keep_their_keys():
    """The keys of the default and smoke digits configurations computed at HEAD cd3ed48, before
    ``model`` and the architecture settings existed."""
    from deconflict.experiments.runner import config_key

    problem = get_problem("digits")
    settings = problem.settings()
    assert config_key(problem.resolve_config(), settings) == "555d90e21e"
    assert config_key(problem.resolve_config(smoke=True), settings) == "ea58aa2574"
    assert config_key(problem.resolve_config({"model": "conv"}), settings) == "555d90e21e"
    assert config_key(problem.resolve_config({"model": "mmoe"}), settings) != "555d90e21e"
    assert problem.resolve_config()["model"] == "conv"


@pytest.mark.parametrize("name", DIGIT_MODELS)
def test_digits_architectures_shapes_heads_and_parameter_counts(name):
    model, data = digit_model(name)
    assert data.train.inputs.shape[1:] == (PIXELS,)  # the canvas, flattened
    x = data.train.inputs[:7]
    _, outputs = model(x)
    assert tuple(outputs["left"].shape) == (7, 10)
    torch.testing.assert_close(outputs["left"].exp().sum(-1), torch.ones(7, dtype=x.dtype))
    assert tuple(outputs["right"].shape) == (7, 64) == tuple(data.train.targets["right"][:7].shape)
    assert bool(((outputs["right"] > 0) & (outputs["right"] < 1)).all())  # sigmoid pixels
    shared, total = digit_counts(name)
    assert numel(p for _, p in model.shared_parameters()) == shared
    assert numel(model.parameters()) == total


@pytest.mark.parametrize("name", DIGIT_MODELS)
def test_digits_gradients_reach_every_expert_and_gate(name):
    model, data = digit_model(name)
    problem = get_problem("digits")
    x, targets = data.train.inputs[:16], {t: v[:16] for t, v in data.train.targets.items()}
    tasks = problem.tasks({})
    shared = {f"shared.{n}" for n, _ in model.shared_parameters()}
    per_task = []
    for t in range(len(tasks)):
        model.zero_grad(set_to_none=True)
        problem.losses(model(x)[1], targets, tasks)[t].backward()
        touched = {n for n, p in model.named_parameters()
                   if p.grad is not None and p.grad.abs().sum() > 0}
        per_task.append(touched)
        assert shared <= touched, (tasks[t], sorted(shared - touched))
    # Every parameter (each expert, gate, unit and head) gets a gradient from some task, and
    # those outside the declared shared ones from exactly one.
    assert set.union(*per_task) == {n for n, _ in model.named_parameters()}
    assert set.intersection(*per_task) == shared
    gates = [n for n, _ in model.named_parameters() if "gate" in n]
    assert bool(gates) == (name not in ("shared_bottom", "cross_stitch"))


@pytest.mark.parametrize("model", DIGIT_MODELS)
def test_digits_smoke_run_through_the_cli(model, tmp_path):
    out = tmp_path / "out"
    started = time.perf_counter()
    assert main(["run", "digits", "--method", "gradops", "--smoke", "--quiet",
                 "--out", str(out), "--set", f"model={model}"]) == 0
    seconds = time.perf_counter() - started
    (path,) = out.rglob("seed0-*.json")
    record = json.loads(path.read_text())
    assert record["config"]["model"] == model
    assert set(record["metrics"]["test"]) == {"accuracy_left", "mse_right"}
    statistics = record["statistics"]
    assert statistics["shared_parameters"] == digit_counts(model)[0]
    assert statistics["parameters"] == digit_counts(model)[1]
    assert statistics["strong_non_conflict_fraction"] == 1.0  # GradOPS on the shared ones
    assert seconds < 120  # a smoke run; typically a few seconds


def test_digits_branching_and_representation_rules():
    problem = get_problem("digits")
    cpu = torch.device("cpu")
    config = problem.resolve_config({"model": "ple", "branch": ["shared_experts.1.0.0"]},
                                    smoke=True)
    model = problem.model_for(config, problem.tasks(config), problem.load(config), 0)
    assert isinstance(model.shared, BranchedModule)
    result = problem.train(lambda: deconflict.GradOPS(), config, 0, cpu)
    assert result.statistics["measured_steps"] > 0
    for name in ("mmoe", "dselect_k", "shared_bottom"):
        config = problem.resolve_config({"model": name, "representation": True}, smoke=True)
        result = problem.train(lambda: deconflict.MGDA(), config, 0, cpu)
        assert result.statistics["measured_steps"] > 0
    for name in ("cgc", "ple", "cross_stitch"):
        config = problem.resolve_config({"model": name, "representation": True}, smoke=True)
        with pytest.raises(deconflict.InvalidOptionError, match="representation mode is not"):
            problem.train(lambda: deconflict.GradOPS(), config, 0, cpu)
        config["representation"] = False
        with pytest.raises(deconflict.InvalidOptionError, match="mgda_ub works on the shared"):
            problem.train(lambda: deconflict.MGDAUB(), config, 0, cpu)


def test_recon_command_on_digits_cross_stitch(tmp_path):
    out = tmp_path / "out"
    assert main(["recon", "digits", "--method", "sum", "--S", "0", "--topk", "1",
                 "--smoke", "--out", str(out), "--quiet", "--set", "model=cross_stitch"]) == 0
    (scores,) = out.rglob("scores.json")
    chosen = json.loads(scores.read_text())["branched"]
    assert len(chosen) == 1
    runs = [json.loads(p.read_text()) for p in (out / "digits" / "runs").rglob("*.json")]
    branched = [r for r in runs if r["config"]["branch"] == chosen]
    plain = [r for r in runs if not r["config"]["branch"]]
    assert branched and plain
    assert (branched[0]["statistics"]["shared_parameters"]
            < plain[0]["statistics"]["shared_parameters"])


@pytest.mark.parametrize("model", ["dselect_k", "ple"])
def test_digits_architecture_killed_after_a_checkpoint_and_resumed_equals_uninterrupted(
        model, tmp_path, monkeypatch):
    # As tests/test_problem_contract.py does for the default model: RLW draws its weights from
    # the global RNG, so a resume that did not restore the RNGs and the gates' state would differ.
    from deconflict.experiments.problems import base

    def run(out, *extra):
        return main(["run", "digits", "--method", "rlw", "--smoke", "--quiet", "--out",
                     str(out), "--set", f"model={model}", "--set", "epochs=2", *extra])

    def record(out):
        (path,) = out.rglob("seed0-*.json")
        result = json.loads(path.read_text())
        result["statistics"].pop("train_seconds", None)
        return result

    assert run(tmp_path / "reference") == 0
    reference = record(tmp_path / "reference")
    stop_after = max(1, reference["statistics"]["steps"] // 2)
    real_save, saves = base.save_torch, []
    monkeypatch.setattr(base, "save_torch", save_then_die(real_save, stop_after, saves))
    killed = tmp_path / "killed"
    with pytest.raises(KilledError):
        run(killed, "--checkpoint-every", "1")
    monkeypatch.setattr(base, "save_torch", real_save)
    assert saves == list(range(1, stop_after + 1)) and list(killed.rglob("*.ckpt"))
    assert run(killed, "--checkpoint-every", "1", "--resume") == 0
    resumed = record(killed)
    assert resumed["config"]["model"] == model
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["statistics"] == reference["statistics"]
