"""Checkpoint and resume: every stateful method (and every seeded random one) continues exactly
where it stopped, through ``state_dict`` / ``load_state_dict`` and ``torch.save`` / ``torch.load``.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from properties import same_state

import deconflict
from deconflict.methods import AfterStep
from deconflict.methods.base import SeededRandomness
from deconflict.methods.registry import method_class

STATEFUL = [
    ("tensioner", {"window": 4}),
    ("gradvac", {"seed": 1}),
    ("gradvac", {"seed": 1, "granularity": "parameter", "ema": "on_correction"}),
    ("gradnorm", {}),
    ("uw", {}),
    ("imtl_l", {}),
    ("dwa", {"steps_per_epoch": 4}),
    ("dwa", {"mode": "window", "window": 3}),
    ("famo", {}),
    ("db_mtl", {"sigma": 0.5}),
    ("nash_mtl", {"update_weights_every": 3}),
    ("pcgrad", {"seed": 2}),
    ("cagrad_fast", {"seed": 3}),
    ("graddrop", {"seed": 4}),
    ("rlw", {"seed": 5}),
    ("cr_mogm", {"base": "tensioner"}),  # a stateful base: its state is nested in the method's
    ("cr_mogm", {}),
    ("pcd", {}),
    ("pcd", {"tau": 0.5, "beta": 0.5}),
    ("moco", {}),
    ("modo", {}),
    ("sdmgrad", {}),
    ("excess_mtl", {}),
    ("excess_mtl", {"n_warmup_steps": 3}),
    ("log_losses", {"base": "nash_mtl"}),  # with a stateful base (MGDA's would not show)
    ("cr_mogm", {"base": "nash_mtl"}),
]
STEPS, STOP = 30, 13


def inputs():
    rng = np.random.default_rng(0)
    J = [torch.from_numpy(rng.standard_normal((3, 7))) for _ in range(STEPS)]
    losses = [np.exp(rng.standard_normal(3)) for _ in range(STEPS + 1)]
    return J, losses


def run(method, J, losses, start, stop):
    outputs = []
    for t in range(start, stop):
        outputs.append(deconflict.aggregate(J[t], method, losses=losses[t], block_sizes=[3, 4]))
        if isinstance(method, AfterStep):
            method.after_step(losses[t + 1])
    return outputs


@pytest.mark.parametrize(("name", "options"), STATEFUL,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in STATEFUL])
def test_resume_reproduces_the_uninterrupted_run_exactly(name, options):
    J, losses = inputs()
    expected = run(deconflict.get(name, **options), J, losses, 0, STEPS)

    first = deconflict.get(name, **options)
    got = run(first, J, losses, 0, STOP)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = deconflict.get(name, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    got += run(resumed, J, losses, STOP, STEPS)

    for t, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"{name} differs at step {t}"
    # The state really matters: a fresh instance does not continue the same way.
    fresh = run(deconflict.get(name, **options), J, losses, STOP, STEPS)
    assert any(not torch.equal(a, b) for a, b in zip(fresh, expected[STOP:], strict=True))


@pytest.mark.parametrize(("name", "options"), STATEFUL[:11],
                         ids=[n for n, _ in STATEFUL[:11]])
def test_reset_forgets_the_state(name, options):
    J, losses = inputs()
    method = deconflict.get(name, **options)
    first = run(method, J, losses, 0, 5)
    method.reset()
    again = run(method, J, losses, 0, 5)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------- the declared state
@pytest.mark.parametrize(("name", "options"), STATEFUL,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in STATEFUL])
def test_the_state_is_a_snapshot_that_loads_with_weights_only(name, options):
    J, losses = inputs()
    method = deconflict.get(name, **options)
    run(method, J, losses, 0, 6)
    saved = method.state_dict()
    assert {field.saved_as for field in method.STATE} <= set(saved)
    frozen = copy.deepcopy(saved)
    run(method, J, losses, 6, 9)  # the live state moves on; the snapshot does not
    assert same_state(saved, frozen)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    restored = deconflict.get(name, **options)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert same_state(restored.state_dict(), frozen)


@pytest.mark.parametrize(("name", "options"), STATEFUL,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in STATEFUL])
def test_reset_and_loading_a_fresh_state_equal_a_new_instance(name, options):
    J, losses = inputs()
    fresh = deconflict.get(name, **options).state_dict()
    method = deconflict.get(name, **options)
    run(method, J, losses, 0, 4)
    method.reset()
    assert same_state(method.state_dict(), fresh)
    run(method, J, losses, 0, 4)
    method.load_state_dict(fresh)
    assert same_state(method.state_dict(), fresh)


def test_unknown_state_is_refused_naming_the_declared_state():
    with pytest.raises(deconflict.InvalidOptionError, match=r"keeps no state \['x'\]; its state "
                       r"is \['alpha', 'step'\]"):
        deconflict.NashMTL().load_state_dict({"x": 1})


def test_a_method_without_a_seed_refuses_a_saved_generator_and_keeps_its_state():
    seeded = deconflict.PCGrad(seed=3).state_dict()
    with pytest.raises(deconflict.InvalidOptionError, match="no seed"):
        deconflict.PCGrad().load_state_dict(seeded)
    assert deconflict.PCGrad().state_dict() == {"generator": None}
    J, losses = inputs()
    method = deconflict.GradVac()
    run(method, J, losses, 0, 3)
    before = method.state_dict()
    other = deconflict.GradVac(seed=1)
    run(other, J, losses, 0, 1)
    with pytest.raises(deconflict.InvalidOptionError, match="no seed"):
        method.load_state_dict(other.state_dict())
    assert same_state(method.state_dict(), before)  # not half loaded


def test_a_tensioner_state_of_another_window_is_refused():
    J, losses = inputs()
    method = deconflict.Tensioner(window=4)
    run(method, J, losses, 0, 2)
    with pytest.raises(deconflict.ShapeError, match=r"expected \(3, T\) for window=3"):
        deconflict.Tensioner(window=3).load_state_dict(method.state_dict())


@pytest.mark.parametrize("name", deconflict.available())
def test_stateful_is_what_the_state_declaration_says(name):
    """``stateful`` (the output depends on earlier calls) is True exactly when the method
    declares state beyond a seeded generator, and every method with state is resumed above."""
    cls = method_class(name)
    own_state = [f for f in cls.STATE if f is not SeededRandomness.GENERATOR_STATE]
    assert cls.stateful == bool(own_state)
    assert issubclass(cls, SeededRandomness) == (SeededRandomness.GENERATOR_STATE in cls.STATE)
    if cls.STATE:
        assert name in {n for n, _ in STATEFUL}
