"""The benchmark scripts' code paths: every workload builds, every variant steps, gpu.py's
no-GPU exit and its checks' power to fail. No timing here (benchmarks print their own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu  # noqa: E402
from _workload import ARCHITECTURES, first_step, workload  # noqa: E402
from step import EXTRAS, OURS, THEIRS  # noqa: E402


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_variant_steps_on_every_workload(architecture: str) -> None:
    """Each variant of step.py runs a step (toy sizes), or says why its library lacks it; the
    "celeba" differs from "cnn" by its BCE losses, not by the code paths of its 40 tasks."""
    tasks = 4 if architecture == "celeba" else 3
    for kind in ("plain", *OURS, *THEIRS, *EXTRAS):
        run, why, result = first_step(kind, "UPGrad", tasks, architecture=architecture,
                                      small=True)
        if kind == "libmtl" and why is not None:
            assert "LibMTL" in why  # not installed, or no UPGrad there
            continue
        assert why is None, f"{kind}: {why}"
        assert run is not None
        if kind == "deconflict:auto-tracked":  # auto resolves to a mode and records it
            assert result.mode in ("sequential", "batched", "gramian")
        elif kind.startswith("deconflict:") and kind != "deconflict:features":
            assert result.mode == kind.split(":")[1]


def test_workloads_have_their_documented_sizes() -> None:
    sizes = {a: workload(3, architecture=a).parameters() for a in ("mlp", "cnn", "transformer")}
    assert sizes == {"mlp": 5_050_368, "cnn": 2_310_432, "transformer": 1_835_520}
    celeba = workload(40, architecture="celeba")
    assert celeba.x.shape == (16, 3, 32, 32) and celeba.y.shape == (40, 16)
    assert set(celeba.y.unique().tolist()) <= {0.0, 1.0}


def test_gpu_script_without_cuda_exits_2_with_one_line() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("no CUDA device: "), done.stderr


def test_gpu_check_passes_on_the_true_update_and_fails_on_a_perturbed_one() -> None:
    """check_update's bound holds for a float32 step and is far below a 1e-4 relative error."""
    import deconflict

    ref = gpu.reference("mlp")
    work = workload(gpu.TASKS, architecture="mlp", small=True)
    J32 = torch.stack(gpu.per_task_gradients(work)[0])
    work = workload(gpu.TASKS, architecture="mlp", small=True)
    _, losses = work.forward()
    record = deconflict.backward(losses, work.trunk, "upgrad", mode="sequential")
    grad = gpu.flat_grad(work.trunk)
    u = gpu.unit_roundoff(torch.float32)
    assert gpu.check_update("mlp", grad, record.weights, J32, ref, u, work.trunk) <= 1.0
    wrong = grad.clone()
    index = int(grad.abs().argmax())
    wrong[index] *= 1 + 1e-4
    with pytest.raises(gpu.CheckFailedError, match=rf"\.grad\[{index}\]"):
        gpu.check_update("mlp", wrong, record.weights, J32, ref, u, work.trunk)


def test_gramian_sweeps_script_runs_and_sweeps(tmp_path: Path) -> None:
    """gramian_sweeps.py at toy size: every variant steps and the result is written."""
    out = tmp_path / "sweeps.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gramian_sweeps.py"), "--quick", "--workloads", "cnn",
         "--tasks", "3", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.exists() and "gramian / autogram" in done.stdout


def test_step_script_prints_both_tables_at_toy_size(tmp_path: Path) -> None:
    """step.py at toy sizes, a T = 3 workload and the T = 40 one: both tables and the goal
    ratios are printed (every method in mode="gramian" and mode="auto" at T = 40)."""
    out = tmp_path / "step.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step.py"), "--workloads", "celeba,mlp", "--tasks", "3",
         "--small", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Gramian / autogram (goal <= 0.8)" in done.stdout
    assert "auto / fastest method's auto (goal <= 1.2)" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    many = [row for row in rows if row["workload"] == "celeba"]
    assert {row["method"] for row in many} >= {"UPGrad", "MGDA", "GradOPS"}
    assert all(row["deconflict:auto-tracked_ms"] and row["deconflict:gramian_ms"] for row in many)
