"""Every registered problem's contract, generated from the problem registry: a new problem is
covered here without new test code.

- its settings are declared and typed: each default and smoke value goes through its CLI text
  and back unchanged; a value of the wrong type, out of range, not among the choices or none
  where none is not allowed is one InvalidOptionError naming the setting and the value;
- ``run --smoke --checkpoint-every 1`` stopped right after a checkpoint and rerun with
  ``--resume`` writes the record an uninterrupted run writes, or the problem refuses
  checkpointing (and ``--nproc``) in one line, exit 2, nothing written;
- a run shows a bar over its steps, with the current losses, nested under the runs bar, and
  ``--quiet`` shows nothing.

The CLI is called in-process (``main(argv)``); data files are generated.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from interrupt import KilledError, save_then_die
from test_experiment_data import census_rows, write_census, write_mnist
from test_nyuv2 import write_nyuv2

import deconflict
from deconflict.cli import main
from deconflict.experiments.problems import PROBLEMS, base
from deconflict.experiments.problems.base import SupervisedProblem
from deconflict.experiments.problems.settings import Setting

NAMES = list(PROBLEMS)
SETTINGS = [(name, setting) for name in NAMES for setting in PROBLEMS[name].settings()]
# The smoke runs, shortened where a problem's smoke run has many steps (every step is a
# checkpoint here): the contract is about what a run writes, not what it learns.
SHORT = {"xor-and": ["--set", "max_epochs=3"], "toy2d": ["--set", "steps=5"]}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_census(root / "census-income", census_rows(600))
    write_mnist(root / "mnist", 400)
    write_nyuv2(root / "nyuv2", counts=(("train", 4), ("val", 2)))
    return root


@pytest.fixture
def data(data_root, monkeypatch):
    monkeypatch.setenv("DECONFLICT_DATA", str(data_root))
    return data_root


def skip_without_extra(name: str) -> None:
    """Skip a problem whose optional extra (``Problem.requires``) is not installed."""
    for module in PROBLEMS[name].requires:
        pytest.importorskip(module)


def as_text(value: Any) -> str:
    """A value as a user types it after ``--set KEY=``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def assert_one_line_error(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deconflict: error: "), captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(("name", "setting"), SETTINGS,
                         ids=[f"{n}-{s.name}" for n, s in SETTINGS])
def test_every_setting_round_trips_through_its_cli_text(name, setting):
    problem = PROBLEMS[name]
    for smoke in (False, True):
        value = problem.resolve_config(smoke=smoke)[setting.name]
        assert value == setting.value(smoke)
        parsed = problem.resolve_config({setting.name: as_text(value)}, smoke=smoke)
        assert parsed == problem.resolve_config(smoke=smoke), (setting.name, as_text(value))
        # A Python caller's typed value is taken too.
        assert problem.resolve_config({setting.name: value}, smoke=smoke)[setting.name] == value
    assert setting.meaning and setting.name in setting.describe()


def bad_values(setting: Setting) -> list[tuple[str, str]]:
    """(CLI text, what the message must say) for values the declaration refuses."""
    cases = []
    if setting.kind in ("int", "float", "ints", "floats", "points", "bool"):
        cases.append(("abc", "is not"))
    if setting.kind == "int":
        cases.append(("1.5", "is not"))
    if setting.kind == "float":
        cases.append(("nan", "is not"))
    if setting.kind in ("ints", "floats"):
        cases += [("[1, 'x']", "is not"), ("[]", "is not")]
    if setting.choices is not None:
        cases.append(("no_such_choice", "is not allowed"))
    element = setting.kind in ("ints", "floats")
    if setting.low is not None:
        below = setting.low if setting.open_low else setting.low - 1
        cases.append((as_text([below] if element else below), "is out of range"))
    if setting.high is not None:
        above = setting.high if setting.open_high else setting.high + 1
        cases.append((as_text([above] if element else above), "is out of range"))
    if not setting.optional and setting.kind != "str":
        cases.append(("none", "cannot be none"))
    return cases


@pytest.mark.parametrize(("name", "setting"), SETTINGS,
                         ids=[f"{n}-{s.name}" for n, s in SETTINGS])
def test_bad_values_of_every_setting_are_refused_naming_it(name, setting):
    problem = PROBLEMS[name]
    for text, says in bad_values(setting):
        with pytest.raises(deconflict.InvalidOptionError) as error:
            problem.resolve_config({setting.name: text}, smoke=True)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{name}: {setting.name}")
        assert says in message and setting.allowed in message, (text, message)


def test_typed_messages_by_hand():
    digits, toy = PROBLEMS["digits"], PROBLEMS["toy2d"]
    with pytest.raises(deconflict.InvalidOptionError,
                       match=r"^digits: epochs=0 is out of range: epochs \(training epochs\) "
                             r"must be an integer >= 1$"):
        digits.resolve_config({"epochs": "0"})
    with pytest.raises(deconflict.InvalidOptionError,
                       match=r"^toy2d: steps=abc is not an integer: steps .* must be an integer "
                             r">= 1$"):
        toy.resolve_config({"steps": "abc"})
    with pytest.raises(deconflict.InvalidOptionError, match=r"steps=-5 is out of range"):
        toy.resolve_config({"steps": "-5"})
    with pytest.raises(deconflict.InvalidOptionError, match=r"lr=0 is out of range: .* > 0"):
        digits.resolve_config({"lr": 0})
    with pytest.raises(deconflict.InvalidOptionError, match="has no setting 'epoch'; its "
                       "settings are: batch_size, branch, data, ddp, dropout, epochs"):
        digits.resolve_config({"epoch": "3"})
    config = digits.resolve_config({"branch": "latent.1,latent.3", "representation": "yes",
                                    "pairs_per_image": "0.5", "data": "none"})
    assert config["branch"] == ["latent.1", "latent.3"] and config["representation"] is True
    assert config["pairs_per_image"] == 0.5 and config["data"] is None
    census = PROBLEMS["census-income"]
    assert census.resolve_config({"hidden": "32/16"})["hidden"] == [32, 16]
    assert census.resolve_config({"hidden": "[32, 16]"})["hidden"] == [32, 16]
    assert census.resolve_config({"subsample": "none"})["subsample"] is None


def test_the_record_stores_the_validated_settings(tmp_path):
    out = tmp_path / "out"
    assert main(["run", "xor-and", "--method", "sum", "--smoke", "--quiet", "--out", str(out),
                 "--set", "max_epochs=2", "--set", "scale=10", "--set", "init_seed=none"]) == 0
    record = json.loads(next(out.rglob("seed0-*.json")).read_text())
    assert record["config"] == PROBLEMS["xor-and"].resolve_config(
        {"max_epochs": 2, "scale": 10.0, "init_seed": None}, smoke=True)
    assert record["config"]["scale"] == 10.0 and isinstance(record["config"]["scale"], float)


def test_problems_register_themselves():
    assert set(NAMES) == set(base.REGISTRY)
    assert all(type(PROBLEMS[name]).name == name for name in NAMES)
    with pytest.raises(TypeError, match="two problems are named 'digits'"):
        type("Again", (SupervisedProblem,), {"name": "digits"})


# --------------------------------------------------------------------- checkpoint and resume
def _run(name: str, out: Path, *extra: str) -> list[str]:
    # RLW draws its weights from the global RNG at every step: a resumed run that did not
    # restore the RNGs would differ.
    return ["run", name, "--method", "rlw", "--smoke", "--quiet", "--out", str(out),
            *SHORT.get(name, []), *extra]


def _record(out: Path) -> dict[str, Any]:
    (path,) = out.rglob("seed0-*.json")
    record = json.loads(path.read_text())
    record["statistics"].pop("train_seconds", None)
    return record


@pytest.mark.parametrize("name", NAMES)
def test_killed_after_a_checkpoint_and_resumed_equals_uninterrupted(name, data, tmp_path,
                                                                    monkeypatch, capsys):
    skip_without_extra(name)
    problem = PROBLEMS[name]
    every = ["--checkpoint-every", "1"]
    if not problem.checkpointable:
        assert main(_run(name, tmp_path / "refused", *every)) == 2
        assert_one_line_error(capsys, name, "--checkpoint-every")
        assert not files(tmp_path / "refused")
        return
    assert main(_run(name, tmp_path / "reference")) == 0
    reference = _record(tmp_path / "reference")
    steps = reference["statistics"]["steps"]
    stop_after = max(1, steps // 2)
    saves: list[int] = []
    real_save = base.save_torch
    die = save_then_die(real_save, stop_after, saves)
    # Wherever the problem's module writes its checkpoints from (the shared loop's or its own).
    writers = {module for module in (base, sys.modules[type(problem).__module__])
               if hasattr(module, "save_torch")}
    for module in writers:
        monkeypatch.setattr(module, "save_torch", die)
    killed = tmp_path / "killed"
    with pytest.raises(KilledError):
        main(_run(name, killed, *every))
    for module in writers:
        monkeypatch.setattr(module, "save_torch", real_save)
    assert saves == list(range(1, stop_after + 1))
    assert not list(killed.rglob("seed0-*.json")) and list(killed.rglob("*.ckpt"))

    assert main(_run(name, killed, *every, "--resume")) == 0
    resumed = _record(killed)
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["statistics"] == reference["statistics"]
    assert not list(killed.rglob("*.ckpt"))  # the record is complete: the checkpoint served


@pytest.mark.parametrize("name", [n for n in NAMES if not PROBLEMS[n].distributable])
def test_nproc_is_refused_in_one_line_where_it_does_not_apply(name, tmp_path, capsys):
    assert main(_run(name, tmp_path, "--nproc", "2")) == 2
    assert_one_line_error(capsys, name, "--nproc applies to")
    assert not files(tmp_path)


# ----------------------------------------------------------------------------------- progress
def expected_steps(name: str, config: dict[str, Any]) -> int:
    problem = PROBLEMS[name]
    if not isinstance(problem, SupervisedProblem):
        return config["steps"]
    return problem.epoch_count(config) * math.ceil(
        len(problem.load(config).train) / config["batch_size"])


@pytest.mark.parametrize("name", NAMES)
def test_a_run_shows_a_bar_over_its_steps_under_the_runs_bar(name, data, tmp_path, capsys):
    skip_without_extra(name)
    arguments = ["run", name, "--method", "mean", "--smoke", "--out", str(tmp_path),
                 *SHORT.get(name, [])]
    assert main(arguments) == 0
    err = capsys.readouterr().err
    record = json.loads(next(tmp_path.rglob("seed0-*.json")).read_text())
    total = expected_steps(name, record["config"])
    assert f"{name}: runs" in err and "run/s" in err
    assert re.search(rf"{re.escape(name)}: mean seed 0.*\b0/{total} ", err), err
    tasks = PROBLEMS[name].tasks(record["config"])
    assert re.search(rf"step/s, {re.escape(tasks[0])} -?\d", err), err  # current losses
    assert main([*arguments, "--quiet", "--force"]) == 0
    assert capsys.readouterr().err == ""
