"""The Census-income study of GradOPS's Appendix C (experiments.census_study): the w_i trace
matches GradOPS's own weights step by step, the gains and the static-grid rank are right on
hand-made tables, runs are recorded and reused, and the figures are written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_experiment_data import census_rows, write_census

import deconflict
from deconflict.experiments import census_study
from deconflict.experiments.census_study import (
    WeightTrace,
    alpha_run,
    epoch_means,
    gains,
    static_grid_summary,
)
from deconflict.experiments.problems import get_problem
from deconflict.methods.gradops import gradops_weights


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    write_census(tmp_path / "data" / "census-income", census_rows(600))
    monkeypatch.setenv("DECONFLICT_DATA", str(tmp_path / "data"))
    return tmp_path


def test_trace_rows_are_gradops_weights_of_each_step():
    # Three tasks on a 4-parameter model whose gradients change every step: each trace row
    # must be the w of Eq. 5 that gradops_weights gives for that step's Gramian.
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    A = torch.randn(3, 4, dtype=torch.float64)
    method = deconflict.GradOPS(alpha=-3.0)
    trace = WeightTrace(method, task_names=["a", "b", "c"])
    expected = []
    for _ in range(5):
        losses = [(A[i] @ w) ** 2 + (A[i] * w).sum() for i in range(3)]
        record = deconflict.backward(losses, [w], method)
        _, diagnostics = gradops_weights(record.gramian.numpy(), -3.0)
        expected.append(diagnostics["w"])
        trace.observe(record)
        with torch.no_grad():
            w -= 0.05 * w.grad
    rows = trace.weights()
    assert rows.shape == (5, 3)
    # Same float64 Gramian, same function: the rows agree to rounding of the weights
    # (mean(w) = 1 over the active tasks, so each is O(1); a few eps of the exp/log chain).
    np.testing.assert_allclose(rows, np.array(expected), rtol=0, atol=64 * np.finfo(float).eps)
    assert trace.steps_with_weights().tolist() == [1, 2, 3, 4, 5]
    # Eq. 5 normalizes w to mean 1 over the active tasks: all three are active here.
    np.testing.assert_allclose(rows.mean(axis=1), 1.0, rtol=0, atol=16 * np.finfo(float).eps)
    # The monitor's own summary still works (it is a ConflictMonitor).
    assert trace.summary()["strong_non_conflict_fraction"] == 1.0


def test_trace_state_round_trips():
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    method = deconflict.GradOPS(alpha=1.0)
    trace = WeightTrace(method)
    record = deconflict.backward([w @ torch.tensor([1.0, 0.0]), w @ torch.tensor([-1.0, 1.0])],
                                 [w], method)
    trace.observe(record)
    copy = WeightTrace(method)
    copy.load_state_dict(trace.state_dict())
    np.testing.assert_array_equal(copy.weights(), trace.weights())


def test_sum_leaves_the_trace_empty():
    w = torch.nn.Parameter(torch.ones(2))
    trace = WeightTrace(deconflict.Sum())
    trace.observe(deconflict.backward([w.sum(), (2 * w).sum()], [w], deconflict.Sum()))
    assert trace.weights().shape == (0, 0)


def test_epoch_means_hand_checked():
    weights = np.array([[1.0, 1.0], [3.0, -1.0], [2.0, 0.0], [4.0, 2.0], [5.0, 5.0]])
    np.testing.assert_array_equal(epoch_means(weights, 2), [[2.0, 0.0], [3.0, 1.0], [5.0, 5.0]])
    with pytest.raises(deconflict.InvalidOptionError, match="steps_per_epoch"):
        epoch_means(weights, 0)


def test_gains_hand_checked():
    uniform = {"auc_a": 0.8, "auc_b": 0.5}
    table = {-3.0: {"auc_a": 0.84, "auc_b": 0.5}, 2.0: {"auc_a": 0.8, "auc_b": 0.45}}
    result = gains(table, uniform, ["a", "b"])
    # (0.84 - 0.8) / 0.8 = 5 %; average 0.67 / 0.65 - 1 = 3.0769... %.
    assert result[-3.0]["a"] == pytest.approx(5.0, rel=1e-12)
    assert result[-3.0]["b"] == 0.0
    assert result[-3.0]["average"] == pytest.approx(100 * (0.67 / 0.65 - 1), rel=1e-12)
    assert result[2.0]["b"] == pytest.approx(-10.0, rel=1e-12)
    assert result[2.0]["average"] == pytest.approx(100 * (0.625 / 0.65 - 1), rel=1e-12)
    with pytest.raises(census_study.DataFormatError, match="b"):
        gains(table, {"auc_a": 0.8}, ["a", "b"])


def _sweep(values, baseline):
    def metrics(means):
        return {f"auc_{t}": {"mean": m, "n": 1} for t, m in zip("xy", means, strict=True)}

    return {"baseline": "gradops(alpha=-3)", "baseline_metrics": metrics(baseline),
            "values": [{"value": w, "metrics": metrics(m)} for w, m in values]}


def test_static_grid_rank_hand_checked():
    sweep = _sweep([([1, 2], (0.9, 0.7)), ([2, 1], (0.8, 0.8)), ([1.5, 1.5], (0.6, 0.6))],
                   (0.85, 0.8))
    summary = static_grid_summary(sweep)
    # Averages: 0.8, 0.8, 0.6 against 0.825: better than all three grid points.
    assert summary["rank"] == 1 and summary["out_of"] == 4 and summary["grid_better"] == 0
    assert summary["best"]["weights"] == [1, 2]
    worse = static_grid_summary(_sweep(sweep_values := [([1, 2], (0.9, 0.9))], (0.85, 0.8)))
    assert worse["rank"] == 2 and sweep_values
    with pytest.raises(census_study.DataFormatError, match="--paired-with"):
        static_grid_summary({"values": sweep["values"]})


def test_alpha_run_records_three_splits_and_weights_and_reuses(data_dir):
    out = data_dir / "results"
    record = alpha_run(-1.0, 0, {"subsample": 256}, out, smoke=True)
    assert set(record["metrics"]) == {"train", "validation", "test"}
    for split in record["metrics"].values():
        assert set(split) == {"auc_income", "auc_marital", "auc_education"}
    weights = np.array(record["weights_per_epoch"])
    assert weights.shape == (1, 3)  # one smoke epoch, three tasks
    assert record["statistics"]["strong_non_conflict_fraction"] == 1.0
    config = get_problem("census-income").resolve_config({"subsample": 256}, smoke=True)
    path = census_study.study_path(out, -1.0, 0, config)
    assert json.loads(path.read_text())["alpha"] == -1.0
    # Reused: the recorded file is returned as it is (no retraining, same numbers).
    stamp = path.stat().st_mtime_ns
    again = alpha_run(-1.0, 0, {"subsample": 256}, out, smoke=True)
    assert again == record and path.stat().st_mtime_ns == stamp
    uniform = alpha_run(None, 0, {"subsample": 256}, out, smoke=True)
    assert uniform["weights_per_epoch"] == [] and uniform["alpha"] is None


def test_bad_input_is_refused_before_training(data_dir):
    with pytest.raises(deconflict.InvalidOptionError, match="alpha"):
        alpha_run(float("nan"), 0, out=data_dir)
    with pytest.raises(deconflict.InvalidOptionError, match="seed"):
        alpha_run(0.0, -1, out=data_dir)
    with pytest.raises(deconflict.InvalidOptionError, match="alphas"):
        census_study.main(["figures", "--alphas", "1,x", "--out", str(data_dir)])
    with pytest.raises(deconflict.InvalidOptionError, match="epochs"):
        census_study.main(["figures", "--epochs", "0", "--out", str(data_dir)])
    assert not (data_dir / "census-income").exists()


def test_main_writes_the_table_and_figures(data_dir):
    out, img = data_dir / "results", data_dir / "img"
    sweep = data_dir / "sweep.json"
    sweep.write_text(json.dumps(_sweep([([1, 2], (0.9, 0.7)), ([2, 1], (0.8, 0.8))],
                                       (0.85, 0.8))))
    code = census_study.main(["figures", "--alphas=-1,0,1", "--smoke", "--out", str(out), "--img",
                              str(img), "--static-sweep", str(sweep)])
    assert code == 0
    table = (out / "census-income" / "alpha_study.md").read_text()
    assert "| uniform (sum) |" in table and "| -1 |" in table and "| 1 |" in table
    for name in ("census_weights_trace.png", "census_alpha_gains.png", "census_static_grid.png"):
        assert (img / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Written atomically: no temporary file is left beside the figures.
    assert sorted(p.name for p in img.iterdir()) == ["census_alpha_gains.png",
                                                    "census_static_grid.png",
                                                    "census_weights_trace.png"]


def _record(seed, aucs):
    return {"seed": seed, "metrics": {"test": {f"auc_{t}": v for t, v in
                                               zip(("income", "marital", "education"), aucs,
                                                   strict=True)}}}


def test_average_auc_table_hand_checked():
    # Averages per seed: sum 0.8, 0.9, 0.85; gradops 0.81, 0.92, 0.86 (differences 0.01, 0.02,
    # 0.01: mean 0.0133..., paired t = 0.01333 / (0.005774 / sqrt 3) = 4.0, p = 0.057); SE of
    # the gradops averages 0.05508 / sqrt 3 = 0.0318.
    records = {
        "sum": {0: _record(0, (0.7, 0.9, 0.8)), 1: _record(1, (0.8, 1.0, 0.9)),
                2: _record(2, (0.75, 0.95, 0.85))},
        "gradops(alpha=-3)": {0: _record(0, (0.73, 0.9, 0.8)), 1: _record(1, (0.86, 1.0, 0.9)),
                              2: _record(2, (0.78, 0.95, 0.85))},
    }
    table = census_study.average_auc_markdown(records, ["sum"])
    lines = table.splitlines()
    assert lines[2].startswith("| sum | 0.8500 +- 0.0289 (3) | - |")
    assert lines[3].startswith("| gradops(alpha=-3) | 0.8633 +- 0.0318 (3) | +0.0133 [")
    assert "p 0.057: no difference shown" in lines[3]
    with pytest.raises(deconflict.InvalidOptionError, match="pcgrad"):
        census_study.average_auc_markdown(records, ["pcgrad"])


def test_averages_reads_the_runner_records(data_dir):
    from deconflict.experiments.runner import MethodSpec, run

    out = data_dir / "results"
    config = get_problem("census-income").resolve_config({"subsample": 256}, smoke=True)
    for name in ("sum", "gradops"):
        for seed in (0, 1):
            run("census-income", MethodSpec.parse(name), seed, config, out=out)
    # The smoke configuration spelled out as --set options, so the records are found.
    smoke = [f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in config.items() if v is not None and k != "branch"]
    args = ["averages", "--methods", "sum,gradops", "--seeds", "2", "--paired-with", "sum",
            "--out", str(out), "--name", "t"]
    for item in smoke:
        args += ["--set", item]
    assert census_study.main(args) == 0
    table = (out / "census-income" / "averages_t.md").read_text()
    assert "| sum |" in table and "| gradops |" in table and "(2)" in table
    with pytest.raises(census_study.DataFormatError, match="no record of pcgrad"):
        census_study.main([*args[:2], "pcgrad", *args[3:]])
