"""deconflict run / compare / sweep on smoke settings: results files, reuse, errors."""

from __future__ import annotations

import json

import pytest
import torch

from deconflict.cli import main
from deconflict.experiments.commands import split_specs
from deconflict.experiments.report import sweep_values
from deconflict.experiments.runner import MethodSpec, parse_value


def test_run_writes_one_json_record_per_seed(tmp_path, capsys):
    assert main(["run", "digits", "--method", "gradops", "--alpha", "-2", "--smoke",
                 "--seeds", "2", "--out", str(tmp_path), "--quiet"]) == 0
    records = sorted((tmp_path / "digits" / "runs" / "gradops_alpha=-2").glob("seed*.json"))
    assert [p.name.split("-")[0] for p in records] == ["seed0", "seed1"]
    record = json.loads(records[0].read_text())
    for key in ("problem", "method", "options", "seed", "config", "metrics", "statistics",
                "deconflict_version", "torch_version", "wall_time_s", "date", "note"):
        assert key in record
    assert record["options"] == {"alpha": -2}
    assert set(record["metrics"]) == {"validation", "test"}
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic writes leave no temporaries
    assert "seed 1:" in capsys.readouterr().out


def test_runs_are_reused_and_forced(tmp_path):
    arguments = ["run", "xor-and", "--method", "mean", "--smoke", "--out", str(tmp_path),
                 "--quiet"]
    main(arguments)
    path = next((tmp_path / "xor-and" / "runs").rglob("*.json"))
    first = json.loads(path.read_text())["date"]
    path.write_text(path.read_text().replace(first, "reused"))
    main(arguments)
    assert json.loads(path.read_text())["date"] == "reused"
    main([*arguments, "--force"])
    assert json.loads(path.read_text())["date"] != "reused"
    main([*arguments, "--set", "scale=10"])  # other settings: a separate record
    assert len(list((tmp_path / "xor-and" / "runs").rglob("*.json"))) == 2


def test_compare_writes_tables_with_baseline_delta_m_and_rank(tmp_path, capsys):
    assert main(["compare", "digits", "--methods", "mean,gradops:alpha=-2", "--smoke",
                 "--seeds", "2", "--out", str(tmp_path), "--quiet"]) == 0
    text = (tmp_path / "digits" / "compare.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| method | accuracy_left | mse_right | Delta_m%")
    body = {line.split(" | ")[0][2:]: line for line in lines[1:]}
    assert set(body) == {"single_task", "mean", "gradops(alpha=-2)"}
    assert "100.0%" in body["gradops(alpha=-2)"]  # strong non-conflict, every step
    csv_header = (tmp_path / "digits" / "compare.csv").read_text().splitlines()[0]
    assert csv_header.startswith("method,seeds,accuracy_left_mean,accuracy_left_std")
    assert "Command: `deconflict compare digits" in text
    assert "split deterministically 60/20/20" in text


def test_sweep_writes_front_csv_and_plot(tmp_path):
    assert main(["sweep", "xor-and", "--method", "gradops", "--alpha", "-1:1:3", "--smoke",
                 "--out", str(tmp_path), "--quiet"]) == 0
    folder = tmp_path / "xor-and"
    rows = (folder / "sweep_gradops_alpha.csv").read_text().splitlines()
    assert rows[0].startswith("alpha,converged,epochs")
    assert [row.split(",")[0] for row in rows[1:]] == ["-1.0", "0.0", "1.0"]
    assert (folder / "sweep_gradops_alpha.png").read_bytes()[:4] == b"\x89PNG"
    assert "Hypervolume" in (folder / "sweep_gradops_alpha.md").read_text()


def test_sweep_values():
    assert sweep_values("-1:1:5", 3) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert sweep_values("0.1,0.5", 3) == [0.1, 0.5]
    grid = sweep_values("simplex:4", 3)  # positive thirds-of-4 parts, times T = 3
    assert len(grid) == 3 and all(sum(w) == pytest.approx(3.0) for w in grid)
    assert [0.75, 0.75, 1.5] in grid


def test_method_spec_parsing():
    spec = MethodSpec.parse("cagrad:c=0.4:rescale=2")
    assert spec.name == "cagrad" and spec.options == {"c": 0.4, "rescale": 2}
    assert spec.label == "cagrad(c=0.4,rescale=2)"
    assert MethodSpec.parse("sum:weights=1/2/1").options == {"weights": (1.0, 2.0, 1.0)}
    # Typed by the declaration: "2" is CAGrad's float c, and PCGrad's seed stays an int.
    assert MethodSpec.parse("cagrad", [("c", "2")]).options == {"c": 2.0}
    assert MethodSpec.parse("pcgrad:seed=7").options == {"seed": 7}
    assert MethodSpec.parse("pcgrad:seed=none").options == {"seed": None}
    assert split_specs("sum:weights=1,2,mgda,gradops:alpha=-2") == [
        "sum:weights=1,2", "mgda", "gradops:alpha=-2"]
    assert MethodSpec.parse("sum:weights=1,2").options == {"weights": (1.0, 2.0)}
    assert parse_value("true") is True and parse_value("none") is None


@pytest.mark.parametrize(("arguments", "message"), [
    (["run", "digits", "--method", "gradops", "--beta", "1"], "its options are: alpha"),
    (["run", "digits", "--method", "gradop"], "Did you mean 'gradops'"),
    (["run", "imagenet", "--method", "sum"], "the problems are"),
    (["run", "digits", "--method", "sum", "--set", "epoch=3"], "has no setting 'epoch'"),
    (["run", "digits", "--method", "sum", "--device", "cuda"], "CUDA is not available"),
    (["compare", "digits", "--methods", "sum:c"], "is not key=value"),
    (["sweep", "digits", "--method", "gradops"], "give the option to sweep"),
    (["run", "digits"], "--method"),
])
def test_bad_options_give_one_line_errors(tmp_path, arguments, message, capsys):
    if arguments[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main([*arguments, "--smoke", "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_help_documents_the_commands(capsys):
    for command in ("run", "compare", "sweep"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "--seeds" in text and "--device" in text and "--out" in text
