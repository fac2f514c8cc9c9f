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


# ------------------------------------------------------------- statistics: --paired-with (issue 17)
def _records(folder, label):
    return {json.loads(p.read_text())["seed"]: json.loads(p.read_text())
            for p in (folder / "runs" / label).glob("seed*.json")}


def test_compare_baseline_gives_paired_numbers_equal_in_markdown_csv_and_json(tmp_path):
    import csv
    import math

    from properties import gamma

    from deconflict.experiments.statistics import paired

    assert main(["compare", "digits", "--methods", "mean,gradops:alpha=-2", "--smoke",
                 "--seeds", "3", "--out", str(tmp_path), "--quiet",
                 "--paired-with", "gradops:alpha=-2"]) == 0  # the spec form names the label
    folder = tmp_path / "digits"
    data = json.loads((folder / "compare.json").read_text())
    assert data["baseline"] == "gradops(alpha=-2)"
    methods = {entry["label"]: entry for entry in data["methods"]}
    assert set(methods) == {"single_task", "mean", "gradops(alpha=-2)"}
    assert "paired" not in methods["gradops(alpha=-2)"]
    mean_runs, base_runs = _records(folder, "mean"), _records(folder, "gradops_alpha=-2")
    assert sorted(mean_runs) == sorted(base_runs) == [0, 1, 2]
    # Mean and standard error by hand from the three run records.
    values = [mean_runs[k]["metrics"]["test"]["accuracy_left"] for k in range(3)]
    centre = sum(values) / 3
    se = math.sqrt(sum((v - centre) ** 2 for v in values) / 2) / math.sqrt(3)
    summary = methods["mean"]["metrics"]["accuracy_left"]
    # Two evaluations of sums of 3 terms, in any order: gamma(8) times the sums' condition
    # (1 for positive accuracies; sum v^2 / sum (v - mean)^2 for the variance).
    condition = 1.0 + sum(v * v for v in values) / max(sum((v - centre) ** 2 for v in values),
                                                        1e-300)
    assert summary["n"] == 3
    assert summary["mean"] == pytest.approx(centre, rel=10 * gamma(8))
    assert summary["se"] == pytest.approx(se, rel=10 * gamma(8) * condition)
    # The paired entry is statistics.paired of the records, seed by seed.
    for metric in ("accuracy_left", "mse_right"):
        expected = paired({k: r["metrics"]["test"][metric] for k, r in mean_runs.items()},
                          {k: r["metrics"]["test"][metric] for k, r in base_runs.items()})
        entry = methods["mean"]["paired"][metric]
        assert entry["pairs"] == 3 and entry["difference"] == expected.difference
        assert entry["p_value"] == expected.p_value and entry["ci"] == list(expected.ci)
    # The CSV carries the same numbers (written with repr, so exactly).
    rows = {row["method"]: row for row in csv.DictReader(
        (folder / "compare.csv").read_text().splitlines())}
    assert float(rows["mean"]["accuracy_left_se"]) == summary["se"]
    assert int(rows["mean"]["accuracy_left_n"]) == 3
    assert rows["mean"]["baseline"] == "gradops(alpha=-2)"
    assert float(rows["mean"]["mse_right_diff"]) == methods["mean"]["paired"]["mse_right"][
        "difference"]
    assert float(rows["mean"]["mse_right_ci_low"]) == methods["mean"]["paired"]["mse_right"][
        "ci"][0]
    # The Markdown: mean +- SE (n) and a paired table whose baseline row says so.
    text = (folder / "compare.md").read_text()
    assert f"{centre:.4f} +- {se:.4f} (3)" in text
    assert "Paired differences against **gradops(alpha=-2)**" in text
    assert "accuracy_left: higher is better; mse_right: lower is better" in text
    paired_rows = [line for line in text.split("Paired differences")[1].splitlines()
                   if line.startswith("| ")]
    assert paired_rows[0] == "| method | accuracy_left | mse_right |"
    assert "| gradops(alpha=-2) | (baseline) | (baseline) |" in paired_rows
    verdicts = ("better", "worse", "no difference shown")
    mean_row = next(line for line in paired_rows if line.startswith("| mean |"))
    assert all(cell.endswith(verdicts) for cell in mean_row.strip("| ").split(" | ")[1:])


def test_compare_without_baseline_has_no_paired_table(tmp_path):
    assert main(["compare", "toy2d", "--methods", "sum,mgda", "--smoke", "--set", "steps=3",
                 "--out", str(tmp_path), "--quiet"]) == 0
    text = (tmp_path / "toy2d" / "compare.md").read_text()
    assert "Paired differences" not in text and "(1) |" not in text
    rows = [line for line in text.splitlines() if line.startswith("| sum")]
    assert "(n = 1)" in rows[0] and " +- " not in rows[0]  # one seed: no standard error
    data = json.loads((tmp_path / "toy2d" / "compare.json").read_text())
    assert data["baseline"] is None and all("paired" not in m for m in data["methods"])
    assert data["methods"][0]["metrics"]["L1"]["se"] is None


@pytest.mark.parametrize(("arguments", "message"), [
    (["compare", "toy2d", "--methods", "sum,mgda", "--paired-with", "cagrad"],
     "--paired-with 'cagrad' is not a method of this comparison; choose one of: sum, mgda"),
    (["compare", "toy2d", "--methods", "sum,cagrad:c=0.2", "--paired-with", "cagrad:c=0.3"],
     "choose one of: sum, cagrad(c=0.2)"),
    (["compare", "digits", "--methods", "sum", "--no-baseline", "--paired-with", "single_task"],
     "choose one of: sum"),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "0:1:3", "--paired-with", "7"],
     "alpha = 7 is not in the grid (0.0, 0.5, 1.0)"),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "0:1:3", "--paired-with", "nosuch"],
     "unknown method 'nosuch'"),
    (["sweep", "toy2d", "--method", "gradops", "--alpha", "0:1:3", "--paired-with",
      "single_task"], "a sweep runs no single-task baseline"),
])
def test_a_bad_baseline_is_refused_before_training(tmp_path, arguments, message, capsys):
    assert main([*arguments, "--smoke", "--quiet", "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not list(tmp_path.rglob("*"))  # nothing trained, nothing written


def test_sweep_baseline_is_a_grid_value_or_a_method_beside_the_grid(tmp_path):
    common = ["sweep", "toy2d", "--method", "gradops", "--alpha", "-1:1:3", "--smoke",
              "--set", "steps=3", "--seeds", "2", "--out", str(tmp_path), "--quiet"]
    folder = tmp_path / "toy2d"
    assert main([*common, "--paired-with", "0"]) == 0
    text = (folder / "sweep_gradops_alpha.md").read_text()
    assert "Paired differences against **gradops(alpha=0)**" in text
    assert "| 0 | (baseline) | (baseline) | (baseline) | (baseline) |" in text
    assert " (2) |" in text  # mean +- SE over the two seeds
    data = json.loads((folder / "sweep_gradops_alpha.json").read_text())
    assert [("paired" in v) for v in data["values"]] == [True, False, True]
    assert "baseline_metrics" not in data
    # Another method: run on the same seeds beside the grid, shown, never on the front.
    assert main([*common, "--paired-with", "sum"]) == 0
    assert sorted(_records(folder, "sum")) == [0, 1]
    text = (folder / "sweep_gradops_alpha.md").read_text()
    baseline_row = next(line for line in text.splitlines() if line.startswith("| baseline:"))
    assert baseline_row.startswith("| baseline: sum |") and baseline_row.endswith("| |")
    data = json.loads((folder / "sweep_gradops_alpha.json").read_text())
    assert data["baseline"] == "sum" and data["baseline_metrics"]["L1"]["n"] == 2
    assert all("paired" in v for v in data["values"])
    assert all(index < 3 for index in data["front"]["indices"])
    header = (folder / "sweep_gradops_alpha.csv").read_text().splitlines()[0]
    assert header.startswith("alpha,L1,L2,mean_loss,pareto_distance,on_front[L1;L2],L1_std,")
    assert ",baseline,L1_diff,L1_diff_se,L1_ci_low,L1_ci_high,L1_p_value,L1_pairs," in header


def test_only_compare_and_sweep_take_a_baseline(capsys):
    for command in ("compare", "sweep"):
        assert main([command, "--help"]) == 0
        assert "--paired-with NAME" in capsys.readouterr().out
    assert main(["run", "--help"]) == 0
    assert "--paired-with" not in capsys.readouterr().out
