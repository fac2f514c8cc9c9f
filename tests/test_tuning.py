"""``compare --grid``: the best value of a problem setting per method, chosen on the validation
split (``experiments.tuning``): selection on hand-made records, bad command lines, resume."""

from __future__ import annotations

import json
import math

import pytest

from deconflict.cli import main
from deconflict.errors import InvalidOptionError
from deconflict.experiments import runner
from deconflict.experiments.problems import get_problem
from deconflict.experiments.problems.base import Metric
from deconflict.experiments.tuning import (
    best_index,
    best_records,
    choose,
    parse_grid,
    parse_select,
)

CONVERGED = Metric("converged", "all", True)
EPOCHS = Metric("epochs", "all", False)
NAN = math.nan


def record(seed: int, **metrics: float) -> dict:
    # Validation and test differ on purpose: the choice must read the validation split only.
    return {"seed": seed, "note": "", "statistics": {},
            "metrics": {"validation": dict(metrics),
                        "test": {k: -1.0 if isinstance(v, float) else v
                                 for k, v in metrics.items()}}}


# ------------------------------------------------------------------------------- selection
def test_lexicographic_rate_first_then_fewest_epochs():
    scores = {0: {"converged": 0.5, "epochs": 100.0}, 1: {"converged": 1.0, "epochs": 900.0},
              2: {"converged": 1.0, "epochs": 400.0}}
    assert best_index(scores, [CONVERGED, EPOCHS]) == 2
    # The order of the metrics is the order of the criteria: epochs first picks value 0.
    assert best_index(scores, [EPOCHS, CONVERGED]) == 0


def test_direction_of_each_metric_is_respected():
    scores = {0: {"m": 1.0}, 1: {"m": 2.0}}
    assert best_index(scores, [Metric("m", "t", True)]) == 1
    assert best_index(scores, [Metric("m", "t", False)]) == 0


def test_ties_go_to_the_value_listed_first():
    scores = {0: {"converged": 1.0, "epochs": 300.0}, 1: {"converged": 1.0, "epochs": 300.0}}
    assert best_index(scores, [CONVERGED, EPOCHS]) == 0
    scores = {1: {"converged": 0.0, "epochs": NAN}, 2: {"converged": 0.0, "epochs": NAN}}
    assert best_index(scores, [CONVERGED, EPOCHS]) == 1


def test_nan_is_the_worst_in_either_direction():
    for higher in (True, False):
        metric = Metric("m", "t", higher)
        assert best_index({0: {"m": NAN}, 1: {"m": 5.0}}, [metric]) == 1
    assert best_index({}, [CONVERGED]) is None


def test_mean_rank_by_hand():
    accuracy, mse = Metric("acc", "a", True), Metric("mse", "b", False)
    # acc ranks: v0 3, v1 1, v2 2; mse ranks: v0 1, v1 3, v2 2 -> mean ranks 2, 2, 2: a tie,
    # the first listed wins.
    scores = {0: {"acc": 0.1, "mse": 0.01}, 1: {"acc": 0.9, "mse": 0.09},
              2: {"acc": 0.5, "mse": 0.05}}
    assert best_index(scores, [accuracy, mse], "mean_rank") == 0
    # v2 now ties v1 on accuracy (ranks 1.5 each) and beats it on mse: means 2, 2.25, 1.75.
    scores[2]["acc"] = 0.9
    assert best_index(scores, [accuracy, mse], "mean_rank") == 2
    # Lexicographic on the same scores: accuracy first, v1 and v2 tie, mse decides: v2.
    assert best_index(scores, [accuracy, mse]) == 2
    with pytest.raises(InvalidOptionError, match="selection rule"):
        best_index(scores, [accuracy], "best")


def test_choose_reads_the_validation_means_and_skips_missing_values():
    problem = get_problem("xor-and")
    config = problem.resolve_config()
    # Value 0: both seeds converged at 400 and 500 (mean 450); value 1: one of two at 300
    # (rate 0.5, mean epochs 300); value 2: no run of "mean" at all.
    records = [
        {"mean": [record(0, converged=1.0, epochs=400.0), record(1, converged=1.0,
                                                                 epochs=500.0)]},
        {"mean": [record(0, converged=1.0, epochs=300.0), record(1, converged=0.0,
                                                                 epochs=None)]},
        {},
    ]
    (choice,) = choose(problem, config, ["mean"], records, [CONVERGED, EPOCHS])
    assert choice.index == 0 and choice.missing == (2,)
    assert choice.scores[0] == {"converged": 1.0, "epochs": 450.0}
    assert choice.scores[1] == {"converged": 0.5, "epochs": 300.0}
    best = best_records(problem, config, records, [choice])
    assert [r["metrics"]["validation"]["epochs"] for r in best["mean"]] == [400.0, 500.0]


def test_the_single_task_baseline_chooses_per_task():
    problem = get_problem("xor-and")
    config = problem.resolve_config()

    def single(seed, xor, and_):
        return record(seed, converged_xor=xor[0], epochs_xor=xor[1], converged_and=and_[0],
                      epochs_and=and_[1])

    # XOR converges only at value 1; AND converges at both, faster at value 0.
    records = [{"single_task": [single(0, (0.0, None), (1.0, 300.0))]},
               {"single_task": [single(0, (1.0, 900.0), (1.0, 600.0))]}]
    (choice,) = choose(problem, config, ["single_task"], records, [CONVERGED, EPOCHS])
    assert choice.per_task == {"xor": 1, "and": 0}
    assert choice.index is None  # no single value
    (merged,) = best_records(problem, config, records, [choice])["single_task"]
    assert merged["metrics"]["validation"] == {"converged_xor": 1.0, "epochs_xor": 900.0,
                                               "converged_and": 1.0, "epochs_and": 300.0}


def test_grid_and_select_parsing():
    problem = get_problem("xor-and")
    config = problem.resolve_config()
    grid = parse_grid(problem, "lr=5e-5, 0.05")
    assert grid.key == "lr" and grid.values == (5e-5, 0.05)
    assert parse_grid(problem, "max_epochs=10,20").values == (10, 20)
    assert parse_select(problem, config, "converged,epochs") == (CONVERGED, EPOCHS)
    for text, says in [("lr", "is not KEY=V1,V2"), ("=0.1", "is not KEY=V1,V2"),
                       ("nope=1,2", "has no setting 'nope'"), ("lr=", "is empty"),
                       ("lr=0.1,,0.2", "has an empty value"), ("lr=0.1,0.1", "repeats"),
                       ("lr=-1", "out of range"), ("lr=abc", "is not a finite number"),
                       ("convergence=code,full_batch", "is not numeric"),
                       ("init_seed=1,2", None)]:
        if says is None:
            parse_grid(problem, text)  # an optional int is numeric
            continue
        with pytest.raises(InvalidOptionError, match=says):
            parse_grid(problem, text)
    with pytest.raises(InvalidOptionError, match="give the setting once"):
        parse_grid(problem, "lr=0.1,0.2", {"lr"})
    for text, says in [("accuracy", "is not a metric of xor-and"), ("", "give metric names"),
                       ("epochs,epochs", "twice")]:
        with pytest.raises(InvalidOptionError, match=says):
            parse_select(problem, config, text)


# ------------------------------------------------------------------------------ command line
BASE = ["compare", "xor-and", "--methods", "mean", "--smoke", "--quiet", "--set",
        "max_epochs=3"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--grid", "nope=1,2", "--select", "converged"], "xor-and has no setting 'nope'"),
    (["--grid", "lr=", "--select", "converged"], "--grid lr= is empty"),
    (["--grid", "convergence=code,full_batch", "--select", "converged"], "is not numeric"),
    (["--grid", "lr=0.1,0.2"], "--grid needs --select"),
    (["--select", "converged"], "--select chooses a value of --grid"),
    (["--select-rule", "mean_rank"], "--select-rule applies with --grid"),
    (["--grid", "lr=0.1,0.2", "--select", "accuracy"], "accuracy is not a metric"),
    (["--grid", "max_epochs=2,4", "--select", "converged"], "give the setting once"),
])
def test_bad_grid_command_lines_are_one_line_exit_2_and_write_nothing(extra, message, tmp_path,
                                                                      capsys):
    assert main([*BASE, "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deconflict: error: "), err
    assert message in err[0]
    assert not (tmp_path / "out").exists()


def test_grid_flags_are_never_abbreviated(tmp_path, capsys):
    # --gri would be a method option given as a flag (refused: compare takes none), never
    # --grid.
    assert main([*BASE, "--out", str(tmp_path), "--gri", "lr=0.1,0.2"]) == 2
    assert "compare takes method options only inside --methods" in capsys.readouterr().err


GRID = [*BASE[:-1], "max_epochs=5", "--seeds", "2", "--grid", "lr=0.05,0.5",
        "--select", "converged,epochs", "--methods", "mean,tensioner"]


def _report(folder):
    data = json.loads((folder / "xor-and" / "compare.json").read_text())
    grid = json.loads((folder / "xor-and" / "compare_grid.json").read_text())
    data.pop("command"), grid.pop("command")
    return data, grid


def test_grid_writes_both_tables_and_resumes_a_partial_grid(tmp_path, monkeypatch, capsys):
    assert main([*GRID, "--out", str(tmp_path / "whole")]) == 0
    whole = _report(tmp_path / "whole")
    text = (tmp_path / "whole" / "xor-and" / "compare.md").read_text()
    assert "| method | chosen lr |" in text and "validation split" in text
    grid_text = (tmp_path / "whole" / "xor-and" / "compare_grid.md").read_text()
    rows = [line for line in grid_text.splitlines() if line.startswith("| tensioner |")]
    assert [row.split(" | ")[1] for row in rows] == ["0.05", "0.5"]
    assert sum(row.rstrip(" |").endswith("*") for row in rows) == 1
    labels = [m["label"] for m in whole[0]["methods"]]
    assert labels == ["single_task", "mean", "tensioner"]
    for entry in whole[0]["methods"]:
        assert entry["chosen"] in (0.05, 0.5) or entry["label"] == "single_task"
    assert set(whole[0]["methods"][0]["chosen_per_task"]) == {"xor", "and"}
    assert whole[0]["selection"]["split"] == "validation"

    # Interrupted after three of the twelve runs (3 labels x 2 values x 2 seeds).
    trained = []
    real = runner.run

    def interrupted(*args, **kwargs):
        if len(trained) == 3:
            raise KeyboardInterrupt
        trained.append(args[1].label)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run", interrupted)  # run_many calls runner.run
    assert main([*GRID, "--out", str(tmp_path / "part")]) == 130
    assert len(list((tmp_path / "part").rglob("seed*.json"))) == 3
    assert not (tmp_path / "part" / "xor-and" / "compare.md").exists()
    monkeypatch.undo()

    counted = []
    real_train = get_problem("xor-and").train

    def count(*args, **kwargs):
        counted.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(get_problem("xor-and"), "train", count)
    assert main([*GRID, "--out", str(tmp_path / "part")]) == 0
    # The three recorded runs are reused, the others train: 16 trainings in all (a
    # single_task record holds one model per task), less those already recorded.
    assert len(list((tmp_path / "part").rglob("seed*.json"))) == 12
    assert len(counted) == 16 - sum(2 if label == "single_task" else 1 for label in trained)
    assert _report(tmp_path / "part") == whole
    capsys.readouterr()

