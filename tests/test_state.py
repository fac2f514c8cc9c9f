"""Checkpoint and resume: every stateful method (and every seeded random one) continues exactly
where it stopped, through ``state_dict`` / ``load_state_dict`` and ``torch.save`` / ``torch.load``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import deconflict

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
