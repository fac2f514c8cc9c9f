"""The pieces of the non-finite checks on their own (issue 13): the one read of the new
gradients (``finite.first_non_finite``), the copy of a method's state around a step
(``engine._KeptState``) and the frontier hooks of ``graph.TaskGraph`` after the pass.

The engine-level behaviour (the task named, ``.grad`` and the state unchanged, for every
method and mode) is in ``test_non_finite.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from properties import same_state
from test_non_finite import TASKS, build, run_step

import deconflict
from deconflict import engine, graph
from deconflict.finite import first_non_finite
from deconflict.methods.base import AfterStep, JacobianAggregator
from deconflict.methods.registry import available, method_class

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


# Small gradients are summed over their concatenation, large ones one by one: both kinds.
SHAPES = [(5, 3), (150, 150), (7,), (2, 130, 70)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("faulty", [(1, 3), (0, 2), (2,)])
def test_the_read_finds_the_first_non_finite_gradient(dtype, bad, faulty):
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=generator).to(dtype) for shape in SHAPES]
    assert first_non_finite([None, *grads]) is None
    for k in faulty:
        grads[k].view(-1)[-1] = bad
    assert first_non_finite([None, *grads]) == faulty[0] + 1
    assert first_non_finite([g for k, g in enumerate(grads) if k not in faulty]) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_sum_that_overflows_is_no_finding(dtype):
    """Finite elements whose sum overflows the dtype (float16: past 65504; the others past
    their largest value): the exact test clears them, so no false positive."""
    largest = torch.finfo(dtype).max
    grads = [torch.full((8,), largest / 2, dtype=dtype), torch.full((3, 2), -largest, dtype=dtype),
             torch.zeros(0, dtype=dtype), torch.full((20_000,), largest / 4, dtype=dtype)]
    assert first_non_finite(grads) is None


def test_the_read_handles_views_complex_and_mixed_dtypes():
    broadcast = torch.tensor([1.0, float("inf")]).expand(3, 2).t()  # stride 0, transposed
    assert first_non_finite([torch.ones(2, dtype=torch.float64), broadcast]) == 1
    assert first_non_finite([torch.tensor([1 + 1j, complex(0.0, float("nan"))])]) == 0
    assert first_non_finite([torch.tensor([1 + 1j, 3e38 + 3e38j])]) is None
    assert first_non_finite([]) is None and first_non_finite([None]) is None


STATEFUL = [name for name in available() if method_class(name).STATE
            and not issubclass(method_class(name), JacobianAggregator)]


def _steps(method, trunk, heads, count):
    for _ in range(count):
        run_step(method, trunk, heads, {})
        if isinstance(method, AfterStep):
            method.after_step([1.0, 2.0, 3.0])


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "after-a-step"])
@pytest.mark.parametrize("name", STATEFUL)
def test_the_kept_state_puts_back_exactly_what_was_there(name, fresh):
    """Kept, then two steps, then put back: the state is the one before, and the next step is
    the one the method would have taken without the two (the kept copy aliases nothing live:
    putting it back twice gives the same state)."""
    trunk, heads = build()
    method, reference = deconflict.get(name), deconflict.get(name)
    for instance in (method, reference):
        torch.manual_seed(3)
        _steps(instance, trunk, heads, 0 if fresh else 1)
    before = copy.deepcopy(method.state_dict())
    kept = engine._KeptState(method)
    torch.manual_seed(4)
    _steps(method, trunk, heads, 2)
    kept.restore()
    assert same_state(method.state_dict(), before)
    torch.manual_seed(4)
    _steps(method, trunk, heads, 1)
    kept.restore()
    assert same_state(method.state_dict(), before)
    torch.manual_seed(5)
    first = run_step(method, trunk, heads, {})
    torch.manual_seed(5)
    second = run_step(reference, trunk, heads, {})
    assert torch.equal(first.weights, second.weights)


def test_the_common_kinds_of_state_are_copied_directly():
    """UW, FAMO, DWA, GradNorm, RLW, Nash-MTL, PCGrad: no generic ``state_dict()`` per step."""
    for name in ("uw", "imtl_l", "famo", "dwa", "gradnorm", "rlw", "nash_mtl", "pcgrad"):
        kept = engine._KeptState(deconflict.get(name))
        assert kept.fields is not None and kept.state is None, name


@pytest.mark.parametrize("retain_graph", [False, True])
def test_the_frontier_hooks_record_one_pass_only(retain_graph):
    """After ``watching``, the hooks are disarmed (or removed, when the graph is retained): a
    later pass through a frontier node records nothing. (Without retain_graph, a later pass
    can still run a head's nodes that saved no tensor: here (z + h_i).sum() down to h_i.)"""
    w = torch.ones(3, requires_grad=True)
    z = w * 2.0
    heads = [torch.ones(3, requires_grad=True) for _ in range(TASKS)]
    roots = [(z + head).sum() for head in heads]
    labelled = graph.TaskGraph(roots, {id(w)})
    assert len(labelled.frontier) == TASKS and labelled.disconnected == []
    with labelled.watching(retain_graph):
        torch.autograd.grad(sum(roots), labelled.leaves, retain_graph=retain_graph)
    assert sorted(task for task, _ in labelled._flows) == list(range(TASKS))
    torch.autograd.grad(roots[0], [heads[0]])
    assert len(labelled._flows) == TASKS
