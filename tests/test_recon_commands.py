"""Recon in training and the diagnose / recon commands, on smoke settings."""

from __future__ import annotations

import json

import pytest
import torch

from deconflict.cli import main
from deconflict.errors import InvalidOptionError
from deconflict.experiments.problems import get_problem
from deconflict.experiments.runner import MethodSpec, config_key

CPU = torch.device("cpu")


def test_branched_training_gives_only_the_shared_parameters_to_the_method():
    """digits with latent.1 (Linear 20*2*2 -> 8 in the smoke model) branched for 2 tasks: one
    more copy of that layer, and the method sees the shared parameters without either copy."""
    problem = get_problem("digits")
    config = problem.resolve_config({"branch": ["latent.1"]}, smoke=True)
    plain = problem.resolve_config(smoke=True)
    data = problem.load(config)
    model = problem.model_for(plain, ("left", "right"), data, seed=0)
    branched = problem.model_for(config, ("left", "right"), data, seed=0)
    latent = sum(p.numel() for p in model.shared.latent[1].parameters())
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in branched.parameters()) == total + latent
    shared = sum(p.numel() for _, p in branched.shared_parameters())
    assert shared == sum(p.numel() for p in model.shared.parameters()) - latent
    result = problem.train(MethodSpec("gradops").factory(), config, 0, CPU)
    assert result.statistics["parameters"] == total + latent
    assert result.statistics["shared_parameters"] == shared
    assert set(result.statistics["layer_conflict_fraction"]) == {"features.0", "features.3"}


def test_neutral_settings_keep_earlier_run_keys():
    problem = get_problem("digits")
    config = problem.resolve_config(smoke=True)
    assert config["branch"] == [] and config["measure_conflicts"] is False
    without = {k: v for k, v in config.items() if k not in ("branch", "measure_conflicts")}
    assert config_key(config) == config_key(without)
    assert config_key({**config, "branch": ["latent.1"]}) != config_key(config)


def test_branching_a_model_without_a_trunk_is_a_clear_error():
    problem = get_problem("xor-and")
    config = problem.resolve_config({"branch": ["0"]}, smoke=True)
    with pytest.raises(InvalidOptionError, match="no single shared trunk"):
        problem.model_for(config, problem.tasks(config), problem.load(config), 0)


def test_mixture_of_experts_models_branch(census_data):
    """MMoE's experts are one module that every task reaches: Recon can branch its layers."""
    from deconflict.recon import BranchedModule

    problem = get_problem("census-income")
    config = problem.resolve_config({"model": "mmoe", "branch": ["0.0"]}, smoke=True)
    model = problem.model_for(config, problem.tasks(config), problem.load(config), 0)
    assert isinstance(model.shared, BranchedModule)


def test_settings_added_with_the_architectures_keep_earlier_run_keys():
    """The census-income key of the default configuration is the one its records had before
    task_experts, levels, k and gamma existed (computed at commit f081658)."""
    problem = get_problem("census-income")
    assert config_key(problem.resolve_config(), problem.settings()) == "bb5e57f0cc"
    changed = problem.resolve_config({"levels": 3})
    assert config_key(changed, problem.settings()) != "bb5e57f0cc"


@pytest.mark.parametrize("problem", ["digits", "census-income"])
def test_diagnose_writes_its_report(problem, tmp_path, capsys, request):
    if problem == "census-income":
        request.getfixturevalue("census_data")
    out = tmp_path / "out"
    assert main(["diagnose", problem, "--method", "sum,gradops:alpha=-2", "--smoke",
                 "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    folder = out / problem / "diagnose"
    for name in ("report.md", "cosine_histograms.png", "sum/steps.csv", "sum/layers.csv",
                 "sum/layer_heatmap.png", "gradops_alpha=-2/summary.json"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "gradops_alpha=-2" / "summary.json").read_text())["summary"]
    assert summary["strong_non_conflict_fraction"] == 1.0  # GradOPS's guarantee
    assert summary["measured_steps"] == summary["steps"] > 0
    text = capsys.readouterr().out
    assert "| sum |" in text and "per shared layer" in text


@pytest.mark.parametrize("problem", ["digits", "census-income"])
def test_recon_scores_branches_and_compares(problem, tmp_path, capsys, request):
    if problem == "census-income":
        request.getfixturevalue("census_data")
    out = tmp_path / "out"
    assert main(["recon", problem, "--method", "sum", "--S", "0", "--topk", "1", "--smoke",
                 "--out", str(out), "--quiet"]) == 0
    folder = out / problem / "recon" / "sum-top1-S0"
    scores = json.loads((folder / "scores.json").read_text())
    assert len(scores["branched"]) == 1
    assert scores["branched"][0] == max(scores["scores"], key=scores["scores"].get)
    for name in ("report.md", "cosine_histograms.png", "base_layer_heatmap.png"):
        assert (folder / name).is_file()
    report = (folder / "report.md").read_text()
    assert "| sum + Recon |" in report and "| sum |" in report
    runs = sorted((out / problem / "runs" / "sum").glob("*.json"))
    records = [json.loads(path.read_text()) for path in runs]
    branched = [r for r in records if r["config"]["branch"]]
    plain = [r for r in records if not r["config"]["branch"]]
    assert len(branched) == len(plain) == 1
    assert branched[0]["statistics"]["parameters"] > plain[0]["statistics"]["parameters"]
    assert branched[0]["statistics"]["shared_parameters"] < \
        plain[0]["statistics"]["shared_parameters"]


def test_diagnose_and_recon_errors(tmp_path, capsys):
    assert main(["diagnose", "toy2d", "--method", "sum", "--out", str(tmp_path)]) == 2
    assert "diagnose and recon take" in capsys.readouterr().err
    assert main(["recon", "digits", "--method", "sum", "--S", "0.5", "--smoke",
                 "--out", str(tmp_path), "--quiet"]) == 2
    assert "S must be in" in capsys.readouterr().err
    assert main(["recon", "digits", "--method", "sum", "--topk", "3", "--S", "0",
                 "--smoke", "--out", str(tmp_path), "--quiet"]) == 2
    assert "every shared layer" in capsys.readouterr().err
