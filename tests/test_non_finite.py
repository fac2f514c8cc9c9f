"""A NaN or infinity in one task's gradient, for every registered method in every mode it
supports: NonFiniteGradientError naming that task and the parameter, with ``.grad`` and the
method's state exactly as before the call (issue 13, items 1 and 2).

The faulty task is the last one (task 2 of 3), so that blaming the first task, or any task the
NaN spreads to inside a batched pass, fails. Its loss stays finite: the NaN appears only in the
backward pass (sqrt at 0 times a zero factor: inf * 0).
"""

from __future__ import annotations

import copy

import pytest
import torch
from properties import same_state
from torch import nn

import deconflict
from deconflict.methods.base import AfterStep, LossWeighting
from deconflict.methods.registry import available, method_class
from deconflict.update import weighs_by_gramian

TASKS = 3
BAD = TASKS - 1


def build():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(TASKS))
    return trunk, heads


def task_losses(trunk, heads, where=None):
    z = trunk(torch.randn(8, 4))
    losses = [heads[t](z).pow(2).mean() for t in range(TASKS)]
    if where == "shared":
        # Finite (zero) value; gradient inf * 0 = NaN at z[0, 0], hence in the trunk.
        losses[BAD] = losses[BAD] + torch.sqrt(z[0, 0] * 0)
    elif where == "head":
        weight = heads[BAD].weight
        losses[BAD] = losses[BAD] + torch.sqrt(weight[0, 0] - weight[0, 0].detach())
    return z, losses


def configurations():
    """(method name, mode label, backward options) for every registered method and mode."""
    cases = []
    for name in available():
        method = deconflict.get(name)
        modes = []
        if not method.needs_features:
            modes += [("sequential", {"mode": "sequential"}), ("batched", {"mode": "batched"}),
                      ("batched-2", {"mode": "batched", "chunk_size": 2})]
            if weighs_by_gramian(method):
                modes.append(("gramian", {"mode": "gramian"}))
            if isinstance(method, LossWeighting):
                modes.append(("per-task", {"compute_gramian": True}))
        modes += [("features", {"mode": "sequential", "features": True}),
                  ("features-batched", {"mode": "batched", "features": True})]
        cases += [(name, label, options) for label, options in modes]
    return cases


CASES = configurations()


def run_step(method, trunk, heads, options, where=None):
    z, losses = task_losses(trunk, heads, where)
    options = dict(options)
    if options.pop("features", False):
        options["features"] = z
    return deconflict.backward(losses, trunk, method, **options)


def grads(trunk, heads):
    return [None if p.grad is None else p.grad.clone()
            for p in [*trunk.parameters(), *heads.parameters()]]


def same_grads(before, after) -> bool:
    return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("where", ["shared", "head"])
@pytest.mark.parametrize(("name", "label", "options"), CASES,
                         ids=[f"{n}-{label}" for n, label, _ in CASES])
def test_a_nan_in_one_task_is_named_and_nothing_changes(name, label, options, where):
    trunk, heads = build()
    if options.get("mode") == "gramian":
        deconflict.track(trunk)
    method = deconflict.get(name)
    # A first, finite step: the method has state and .grad holds gradients to accumulate onto.
    run_step(method, trunk, heads, options)
    if isinstance(method, AfterStep):
        method.after_step([1.0] * TASKS)
    before, state = grads(trunk, heads), copy.deepcopy(method.state_dict())

    subject = "shared parameter|the features" if where == "shared" else "task-specific parameter"
    with pytest.raises(deconflict.NonFiniteGradientError,
                       match=rf"gradient of loss {BAD} with respect to .*({subject})"):
        run_step(method, trunk, heads, options, where)

    assert same_grads(before, grads(trunk, heads)), ".grad changed by a failed step"
    assert same_state(method.state_dict(), state), f"{name}'s state advanced in a failed step"


def test_the_issue_example_raises_for_mean():
    """Issue 13, item 1: a NaN in one task's gradient used to reach .grad silently."""
    trunk = nn.Linear(4, 6)
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
    z = trunk(torch.randn(8, 4))
    losses = [heads[0](z).pow(2).mean(), heads[1](z).pow(2).mean() + torch.sqrt(z[0, 0] * 0)]
    with pytest.raises(deconflict.NonFiniteGradientError,
                       match=r"loss 1 with respect to shared parameter weight"):
        deconflict.backward(losses, trunk, "mean")
    assert trunk.weight.grad is None and all(p.grad is None for p in heads.parameters())


def test_batched_mode_blames_the_task_at_fault_not_the_first():
    """Issue 13, item 2: inside a batched pass the NaN of loss 1 spreads to loss 0's row."""
    trunk = nn.Linear(4, 6)
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
    z = trunk(torch.randn(8, 4))
    losses = [heads[0](z).pow(2).mean(), heads[1](z).pow(2).mean() + torch.sqrt(z[0, 0] * 0)]
    for mode in ("batched", "sequential"):
        with pytest.raises(deconflict.NonFiniteGradientError, match="loss 1 with respect to"):
            deconflict.backward(losses, trunk, deconflict.UPGrad(), mode=mode, retain_graph=True)


def test_a_nan_arising_in_the_shared_trunk_is_reported_for_loss_weighting():
    """A NaN made by the trunk itself is in every task's gradient: no single task is blamed."""
    trunk = nn.Linear(4, 6)
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
    h = trunk(torch.randn(8, 4))
    z = h + torch.sqrt(h[:, :1] * 0)  # every task's gradient: NaN below z
    losses = [head(z).pow(2).mean() for head in heads]
    with pytest.raises(deconflict.NonFiniteGradientError, match="arises in the shared part"):
        deconflict.backward(losses, trunk, "sum")
    assert trunk.weight.grad is None


def test_a_gradscaler_still_skips_instead_of_raising():
    """With a scaler, a non-finite gradient is an overflow: the step is skipped, not raised."""
    trunk, heads = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    for name in ("mean", "upgrad"):
        _, losses = task_losses(trunk, heads, "shared")
        record = deconflict.backward(losses, trunk, deconflict.get(name), scaler=scaler)
        assert record.skipped and "loss 2" in record.diagnostics["overflow"]


@pytest.mark.parametrize("name", [n for n in available() if method_class(n).stateful
                                  and issubclass(method_class(n), LossWeighting)])
def test_a_failed_loss_weighting_step_does_not_advance_the_weights(name):
    """The next finite step gives the same update as if the failed one had not happened."""
    trunk, heads = build()
    method, reference = deconflict.get(name), deconflict.get(name)
    for instance in (method, reference):
        torch.manual_seed(4)
        run_step(instance, trunk, heads, {})
        if isinstance(instance, AfterStep):
            instance.after_step([1.0, 2.0, 3.0])
    with pytest.raises(deconflict.NonFiniteGradientError):
        run_step(method, trunk, heads, {}, "shared")
    torch.manual_seed(5)
    first = run_step(method, trunk, heads, {})
    torch.manual_seed(5)
    second = run_step(reference, trunk, heads, {})
    assert torch.equal(first.weights, second.weights)


def _labels_by_reachability(roots):
    """Each node's owner by brute force: the task whose graph alone reaches it, or -1."""
    from deconflict import graph

    reached: dict = {}
    for task, root in enumerate(roots):
        for node in graph.nodes([root.grad_fn]):
            reached.setdefault(node, set()).add(task)
    return {node: next(iter(tasks)) if len(tasks) == 1 else -1
            for node, tasks in reached.items()}


@pytest.mark.parametrize("seed", range(12))
def test_task_labels_match_reachability_on_varied_graphs(seed):
    """The two-walk labelling (``graph.TaskGraph``) against reachability, on graphs whose tasks
    share different parts: a trunk, a second shared stage used by some tasks only, skips from a
    head into the middle of the trunk. Built afresh each time: a new structure is labelled
    from scratch, nothing carries over from the previous graph."""
    from deconflict import graph

    generator = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(5, 5) for _ in range(4)]
    x = torch.randn(3, 5, generator=generator)
    stages = [x]
    for layer in layers:
        stages.append(torch.tanh(layer(stages[-1])))
    tasks = int(torch.randint(2, 6, (1,), generator=generator))
    roots = []
    for _ in range(tasks):
        picks = torch.randint(1, len(stages), (2,), generator=generator).tolist()
        head = nn.Linear(5, 1)
        roots.append((head(stages[picks[0]]) * stages[picks[1]]).pow(2).mean())
    labelled = graph.TaskGraph(roots)
    owner = _labels_by_reachability(roots)
    expected = set()
    for node, task in owner.items():
        if task == -1 or hasattr(node, "variable"):
            continue
        edges = [k for k, (child, _) in enumerate(node.next_functions)
                 if child is not None and owner.get(child) == -1]
        if edges:
            expected.add((node, task, tuple(edges)))
    assert {(node, task, tuple(edges)) for node, task, edges in labelled.frontier} == expected
    leaves = {id(node.variable): task for node, task in owner.items() if hasattr(node, "variable")}
    assert {id(leaf) for leaf in labelled.leaves} == set(leaves)
    assert labelled._leaf_owner == leaves
    # The same walk finds the losses that reach none of the shared leaves: each leaf alone, and
    # a random half of them.
    picks = torch.randint(0, 2, (len(labelled.leaves),), generator=generator).tolist()
    subsets = [{id(leaf)} for leaf in labelled.leaves]
    subsets.append({id(leaf) for leaf, pick in zip(labelled.leaves, picks, strict=True) if pick})
    for shared in subsets:
        expected_disconnected = [task for task, root in enumerate(roots)
                                 if not graph.reaches([root], shared)]
        assert graph.TaskGraph(roots, shared).disconnected == expected_disconnected
