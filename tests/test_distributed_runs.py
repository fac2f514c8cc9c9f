"""`deconflict run --nproc 2`: the benchmark runner on torch.distributed (gloo), exact mode
matching the one-process run, local mode running, and the options checked."""

from __future__ import annotations

import json

import pytest

from deconflict.cli import main


def _record(out, label: str) -> dict:
    return json.loads(next((out / "digits" / "runs" / label).glob("seed0-*.json")).read_text())


def test_two_processes_exact_equal_one_process_and_local_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = ["run", "digits", "--method", "gradops", "--smoke", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "local"), "--nproc", "2",
                 "--set", "ddp=local"]) == 0
    one, two = _record(tmp_path / "one", "gradops"), _record(tmp_path / "two", "gradops")
    local = _record(tmp_path / "local", "gradops")
    assert (one["nproc"], two["nproc"], local["config"]["ddp"]) == (1, 2, "local")
    for metric, value in one["metrics"]["test"].items():
        assert two["metrics"]["test"][metric] == pytest.approx(value, rel=1e-4)
    # exact mode: every step's update is the global-batch update, so GradOPS's guarantee holds
    assert two["statistics"]["strong_non_conflict_fraction"] == 1.0
    assert local["metrics"]["test"]["mse_right"] > 0


def test_nproc_is_checked(tmp_path, capsys):
    out = ["--out", str(tmp_path), "--smoke", "--quiet"]
    assert main(["run", "xor-and", "--method", "sum", "--nproc", "2", *out]) == 2
    assert "--nproc" in capsys.readouterr().err
    assert main(["run", "digits", "--method", "sum", "--nproc", "0", *out]) == 2
    assert "argument --nproc: expected an integer >= 1" in capsys.readouterr().err
