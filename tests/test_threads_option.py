"""``--threads N`` of the experiment commands: PyTorch's intra-op threads while a run trains.

The thread count is process-wide state, and the commands also run in-process (these tests,
notebooks): it must be set only around training and be back afterwards, after a failure too.
The record says the count training ran with, so a wall time can be read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from deconflict.cli import main
from deconflict.errors import InvalidOptionError
from deconflict.experiments.problems import PROBLEMS
from deconflict.experiments.runner import (
    MethodSpec,
    intra_op_threads,
    rank_threads,
    run_many,
)

# toy2d for three steps: the fastest run there is; what it learns does not matter here.
FAST = ["--smoke", "--quiet", "--set", "steps=3"]


@pytest.fixture
def two_threads() -> Iterator[int]:
    """The caller's count set to 2 (conftest pins 1), so a restore to it is visible, and the
    suite's own count put back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _record(folder) -> dict:
    (path,) = folder.rglob("seed*.json")
    return json.loads(path.read_text())


def test_run_records_the_threads_and_restores_the_callers(tmp_path, two_threads, capsys):
    assert main(["run", "toy2d", "--method", "sum", *FAST, "--threads", "1",
                 "--out", str(tmp_path / "one")]) == 0
    assert _record(tmp_path / "one")["threads"] == 1
    assert torch.get_num_threads() == two_threads
    # Without the flag PyTorch's count is left alone, and recorded as what training used.
    assert main(["run", "toy2d", "--method", "sum", *FAST, "--out", str(tmp_path / "d")]) == 0
    assert _record(tmp_path / "d")["threads"] == two_threads
    assert torch.get_num_threads() == two_threads
    capsys.readouterr()


@pytest.mark.parametrize("method", ["sum", "single_task"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_threads_are_restored_when_training_fails(method, error, tmp_path, two_threads,
                                                  monkeypatch, capsys):
    seen: list[int] = []

    def train(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise error("training failed")

    monkeypatch.setattr(PROBLEMS["toy2d"], "train", train)
    command = ["run", "toy2d", "--method", method, *FAST, "--threads", "1",
               "--out", str(tmp_path)]
    if error is KeyboardInterrupt:
        assert main(command) == 130  # Ctrl-C: the CLI's exit, the count restored below it
    else:
        with pytest.raises(RuntimeError, match="training failed"):
            main(command)
    assert seen == [1]  # the requested count was in effect when training started
    assert torch.get_num_threads() == two_threads
    assert not list(tmp_path.rglob("*.json"))
    capsys.readouterr()


def test_the_library_refuses_a_bad_count_before_anything_trains(tmp_path, monkeypatch):
    def train(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(PROBLEMS["toy2d"], "train", train)
    config = PROBLEMS["toy2d"].resolve_config({}, smoke=True)
    for bad in (0, -2, True, 1.5):
        with pytest.raises(InvalidOptionError, match="--threads"):
            run_many("toy2d", [MethodSpec("sum")], [0], config, out=tmp_path, progress=False,
                     threads=bad)
    assert not list(tmp_path.rglob("*"))


def test_intra_op_threads_sets_only_inside_and_leaves_none_alone(two_threads):
    with intra_op_threads(None) as used:
        assert used == torch.get_num_threads() == two_threads
    with intra_op_threads(1) as used:
        assert used == torch.get_num_threads() == 1
    assert torch.get_num_threads() == two_threads


def test_rank_threads_defaults_to_the_cores_shared_among_the_ranks(monkeypatch):
    monkeypatch.setattr("deconflict.experiments.runner.os.cpu_count", lambda: 8)
    assert [rank_threads(None, n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    assert rank_threads(3, 2) == 3  # --threads N: N per rank, whatever the machine
    monkeypatch.setattr("deconflict.experiments.runner.os.cpu_count", lambda: None)
    assert rank_threads(None, 4) == 1


@pytest.mark.parametrize("command", ["diagnose", "recon"])
def test_the_monitored_runs_take_the_threads_too(command, tmp_path, two_threads, monkeypatch,
                                                 capsys):
    """diagnose and recon's scoring run train in this process through ``monitored_run``, not
    the runner: --threads applies there as well, and is restored."""
    seen: list[int] = []

    def train(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(PROBLEMS["digits"], "train", train)
    with pytest.raises(RuntimeError, match="stop after the check"):
        main([command, "digits", "--method", "sum", "--smoke", "--quiet", "--threads", "1",
              "--out", str(tmp_path)])
    assert seen == [1]
    assert torch.get_num_threads() == two_threads
    capsys.readouterr()
