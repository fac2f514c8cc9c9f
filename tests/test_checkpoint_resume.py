"""Interruptible runs: a run stopped after its k-th checkpoint and resumed ends exactly as an
uninterrupted one (metrics, statistics, parameters), in process and when the process is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from interrupt import KilledError, save_then_die

from deconflict.cli import main
from deconflict.errors import InvalidOptionError
from deconflict.experiments.problems import base, get_problem
from deconflict.experiments.runner import MethodSpec

CPU = torch.device("cpu")


def _train(problem, spec, config, checkpoint=None):
    return problem.train(spec.factory(), config, 0, CPU, checkpoint=checkpoint)


def _assert_same_run(resumed, uninterrupted):
    assert resumed.metrics == uninterrupted.metrics
    strip = {"train_seconds"}
    assert ({k: v for k, v in resumed.statistics.items() if k not in strip}
            == {k: v for k, v in uninterrupted.statistics.items() if k not in strip})
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(),
                                 uninterrupted.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("problem_name", "method", "every", "stop_after"), [
    ("digits", "dwa", 4, 2),            # mid-epoch; DWA's per-epoch state
    ("digits", "pcgrad", 5, 1),         # at an epoch's end; PCGrad draws from the global RNG
    ("census-income", "gradvac", 3, 3),  # dropout (global RNG) and GradVac's moving targets
    ("census-income", "famo", 2, 1),     # FAMO's learnable weights and their optimizer
])
def test_killed_after_a_checkpoint_and_resumed_equals_uninterrupted(
        problem_name, method, every, stop_after, tmp_path, monkeypatch, request):
    if problem_name == "census-income":
        request.getfixturevalue("census_data")
    problem = get_problem(problem_name)
    config = problem.resolve_config({"epochs": 3, "batch_size": 64}, smoke=True)  # 5 steps/epoch
    spec = MethodSpec(method)
    uninterrupted = _train(problem, spec, config)

    plan = base.Checkpointing(tmp_path / "run.ckpt", every)
    saves: list[int] = []
    real_save = base.save_torch
    monkeypatch.setattr(base, "save_torch", save_then_die(real_save, stop_after, saves))
    with pytest.raises(KilledError):
        _train(problem, spec, config, plan)
    monkeypatch.setattr(base, "save_torch", real_save)
    assert saves == [every * k for k in range(1, stop_after + 1)]

    resumed = _train(problem, spec, config, base.Checkpointing(plan.path, every, resume=True))
    _assert_same_run(resumed, uninterrupted)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    problem = get_problem("digits")
    config = problem.resolve_config({"epochs": 1}, smoke=True)
    path = tmp_path / "run.ckpt"
    _train(problem, MethodSpec("sum"), config, base.Checkpointing(path, 2))
    with pytest.raises(InvalidOptionError, match="belongs to another run"):
        _train(problem, MethodSpec("mgda"), config, base.Checkpointing(path, 2, resume=True))
    with pytest.raises(InvalidOptionError, match="positive number of steps"):
        base.Checkpointing(path, 0)


def test_checkpoint_options_are_checked(tmp_path, capsys):
    out = ["--out", str(tmp_path), "--smoke", "--quiet"]
    assert main(["run", "xor-and", "--method", "sum", "--checkpoint-every", "5", "--nproc", "2",
                 *out]) == 2
    assert "xor-and trains on 4 points" in capsys.readouterr().err
    assert main(["run", "digits", "--method", "sum", "--resume", *out]) == 2
    assert "--resume needs --checkpoint-every" in capsys.readouterr().err


def test_the_command_survives_sigkill(tmp_path):
    """`deconflict run` killed (SIGKILL) once a checkpoint exists, then rerun with --resume,
    writes the same record as an uninterrupted run; the checkpoint is removed at the end."""
    command = [sys.executable, "-m", "deconflict.cli", "run", "digits", "--method", "dwa",
               "--smoke", "--set", "epochs=60", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_out, reference_out = tmp_path / "killed", tmp_path / "reference"
    process = subprocess.Popen([*command, "--out", str(killed_out), "--checkpoint-every", "7"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(killed_out.rglob("*.ckpt")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list(killed_out.rglob("seed0-*.json"))  # the run did not complete
    checkpoint = torch.load(next(killed_out.rglob("*.ckpt")), weights_only=False)
    assert checkpoint["step"] % 7 == 0 and checkpoint["step"] < 60 * 5

    subprocess.run([*command, "--out", str(killed_out), "--checkpoint-every", "7", "--resume"],
                   env=env, check=True, capture_output=True)
    subprocess.run([*command, "--out", str(reference_out)], env=env, check=True,
                   capture_output=True)
    resumed = json.loads(next(killed_out.rglob("seed0-*.json")).read_text())
    reference = json.loads(next(reference_out.rglob("seed0-*.json")).read_text())
    assert resumed["metrics"] == reference["metrics"]
    for record in (resumed, reference):
        record["statistics"].pop("train_seconds")
    assert resumed["statistics"] == reference["statistics"]
    assert not list(killed_out.rglob("*.ckpt"))
