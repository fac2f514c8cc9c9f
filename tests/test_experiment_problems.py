"""Every problem's smoke configuration trains end to end in seconds (generated data where files
are needed), and the problem rules behave as documented."""

from __future__ import annotations

import math

import pytest
import torch
from interrupt import KilledError, save_then_die
from test_experiment_data import census_rows, write_census, write_mnist

import deconflict
from deconflict.diagnostics import ConflictMonitor
from deconflict.experiments.problems import PROBLEMS, get_problem

CPU = torch.device("cpu")


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    write_census(tmp_path / "census-income", census_rows(600))
    write_mnist(tmp_path / "mnist", 400)
    monkeypatch.setenv("DECONFLICT_DATA", str(tmp_path))
    return tmp_path


def smoke(name: str, method: str = "gradops", **options):
    problem = get_problem(name)
    config = problem.resolve_config(smoke=True)
    return problem, config, problem.train(lambda: deconflict.get(method, **options), config, 0,
                                          CPU)


@pytest.mark.parametrize("name", ["toy2d", "xor-and", "census-income", "digits", "multi-mnist"])
def test_smoke_config_trains_and_reports_every_metric(name, data_dir):
    problem, config, result = smoke(name)
    names = {m.name for m in problem.metrics(config)}
    for split in ("validation", "test"):
        assert set(result.metrics[split]) == names
        for metric in names:
            value = result.metrics[split][metric]
            assert math.isnan(value) or math.isfinite(value)


@pytest.mark.parametrize("name", ["census-income", "digits", "multi-mnist", "xor-and"])
def test_gradops_training_never_conflicts(name, data_dir):
    _, _, result = smoke(name)
    statistics = result.statistics
    assert statistics["measured_steps"] > 0
    assert statistics["strong_non_conflict_fraction"] == 1.0
    assert statistics["weak_non_conflict_fraction"] == 1.0


def test_single_task_training(data_dir):
    problem = get_problem("census-income")
    config = problem.resolve_config(smoke=True)
    result = problem.train(lambda: deconflict.Sum(), config, 0, CPU, tasks=["income"])
    assert set(result.metrics["test"]) == {"auc_income"}


def test_census_mmoe_and_representation_mode(data_dir):
    problem = get_problem("census-income")
    config = problem.resolve_config({"model": "mmoe", "representation": True}, smoke=True)
    result = problem.train(lambda: deconflict.MGDA(), config, 0, CPU)
    assert set(result.metrics["test"]) == {"auc_income", "auc_marital", "auc_education"}
    with pytest.raises(deconflict.InvalidOptionError, match="must be one of shared_bottom, mmoe"):
        problem.resolve_config({"model": "resnet"}, smoke=True)  # refused before training
    config["model"] = "resnet"  # a Python caller bypassing resolve_config still gets told
    with pytest.raises(deconflict.InvalidOptionError, match="mmoe"):
        problem.train(lambda: deconflict.Sum(), config, 0, CPU)


def test_mgda_ub_switches_representation_mode_on(data_dir):
    _, _, result = smoke("digits", "mgda_ub")
    assert result.statistics["measured_steps"] > 0


def test_famo_and_dwa_get_their_hooks(data_dir):
    for method in ("famo", "dwa"):
        _, _, result = smoke("digits", method)
        assert math.isfinite(result.metrics["test"]["accuracy_left"])


def test_digits_both_classification_variant():
    problem = get_problem("digits")
    config = problem.resolve_config({"variant": "classify_both"}, smoke=True)
    result = problem.train(lambda: deconflict.Mean(), config, 0, CPU)
    assert set(result.metrics["test"]) == {"accuracy_left", "accuracy_right"}


def test_xor_and_converges_like_the_paper_with_the_tensioner():
    """Table 2 (c = 10): central + tension converges in ~188 epochs; plain sum does not."""
    problem = get_problem("xor-and")
    config = problem.resolve_config({"scale": 10.0})
    result = problem.train(lambda: deconflict.Tensioner(), config, 0, CPU)
    assert result.metrics["test"]["converged"] == 1.0
    assert 100 <= result.metrics["test"]["epochs"] <= 300
    single = problem.train(lambda: deconflict.Sum(), config, 0, CPU, tasks=["and"])
    assert set(single.metrics["test"]) == {"converged_and", "epochs_and"}


def test_unknown_problem_and_setting():
    with pytest.raises(deconflict.InvalidOptionError, match="the problems are"):
        get_problem("imagenet")
    with pytest.raises(deconflict.InvalidOptionError, match="has no setting 'epoch'"):
        get_problem("digits").resolve_config({"epoch": 3})


def test_every_problem_declares_its_configs_and_metrics():
    for problem in PROBLEMS.values():
        for smoke_config in (False, True):
            config = problem.resolve_config(smoke=smoke_config)
            metrics = problem.metrics(config)
            assert metrics and all(m.task in (*problem.tasks(config), "all") for m in metrics)


def test_conflict_summary_by_hand():
    """Two steps of plain summation (c = 1): one with gradients (1, 0) and (-1, 1) conflicting
    and an update J^T (1, 1) = (0, 1), which conflicts with nobody (weak) while the pair does
    conflict (not strong: the modified gradients c_i g_i are the originals); one without
    conflict."""
    monitor = ConflictMonitor(deconflict.Sum())
    c = torch.ones(2, dtype=torch.float64)
    for M in (torch.tensor([[1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64),
              torch.eye(2, dtype=torch.float64)):
        monitor.observe(deconflict.StepRecord(weights=c, losses=torch.ones(2), gramian=M,
                                              update_products=M @ c,
                                              update_sq_norm=float(c @ M @ c)))
    summary = monitor.summary()
    assert summary["weak_non_conflict_fraction"] == 1.0
    assert summary["strong_non_conflict_fraction"] == 0.5
    assert summary["mean_conflicting_pairs"] == 0.5




# ------------------------------------------------------------------ optimizer, early stopping
def _digits(**overrides):
    problem = get_problem("digits")
    return problem, problem.resolve_config({"optimizer": "sgd", "lr": 0.05, **overrides},
                                           smoke=True)


def test_sgd_with_momentum_and_the_neutral_defaults():
    from deconflict.experiments.runner import config_key

    problem, config = _digits(momentum=0.5)
    model = problem.model_for(config, problem.tasks(config), problem.load(config), 0)
    optimizer = problem.make_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.5 and optimizer.defaults["lr"] == 0.05
    assert isinstance(problem.make_optimizer(model, problem.resolve_config()), torch.optim.Adam)
    with pytest.raises(deconflict.InvalidOptionError, match="applies to optimizer=sgd only"):
        problem.make_optimizer(model, problem.resolve_config({"momentum": 0.5}))
    # At their defaults the new settings leave a run's key as it was; set, they change it.
    settings = problem.settings()
    default = problem.resolve_config()
    explicit = problem.resolve_config({"optimizer": "adam", "momentum": 0.9, "patience": "none"})
    assert config_key(explicit, settings) == config_key(default, settings)
    for changed in ({"optimizer": "sgd"}, {"patience": 10}):
        assert config_key(problem.resolve_config(changed), settings) != config_key(default,
                                                                                    settings)


def _scripted(problem, monkeypatch, sequence):
    """Make the validation losses of successive epochs follow ``sequence``."""
    scores = iter(sequence)
    monkeypatch.setattr(problem, "validation_losses",
                        lambda run, batch_size=4096: torch.tensor(next(scores)))


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch(monkeypatch):
    # Scale-free score sum_t L_t / L_t(epoch 1): epoch 1 gives 2, epoch 2 0.5 + 1.2 = 1.7 (the
    # best: a 10x larger first task decides no more than the second), epoch 3 0.8 + 1.0 = 1.8
    # and epoch 4 0.6 + 1.5 = 2.1 are not better: patience 2 stops after epoch 4.
    problem, config = _digits(epochs=8, patience=2)
    _scripted(problem, monkeypatch, [[10.0, 0.1], [5.0, 0.12], [8.0, 0.1], [6.0, 0.15]])
    stopped = problem.train(lambda: deconflict.get("mean"), config, 0, CPU)
    assert stopped.statistics["best_epoch"] == 2 and stopped.statistics["epochs_run"] == 4
    assert stopped.statistics["best_validation_score"] == pytest.approx(1.7, rel=1e-6)
    steps_per_epoch = stopped.statistics["steps"] // 4
    # The reported metrics and weights are those after epoch 2: a 2-epoch run's (training is
    # deterministic on the CPU and evaluating draws no random number).
    monkeypatch.undo()
    _, two = _digits(epochs=2)
    reference = problem.train(lambda: deconflict.get("mean"), two, 0, CPU)
    assert reference.statistics["steps"] == 2 * steps_per_epoch
    assert stopped.metrics == reference.metrics
    for (name, a), (_, b) in zip(stopped.model.state_dict().items(),
                                 reference.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_without_patience_every_epoch_runs(monkeypatch):
    problem, config = _digits(epochs=3)
    calls = []
    monkeypatch.setattr(problem, "validation_losses", lambda *a, **k: calls.append(1))
    result = problem.train(lambda: deconflict.get("mean"), config, 0, CPU)
    assert not calls and "best_epoch" not in result.statistics


def test_validation_losses_are_the_split_means():
    problem, config = _digits()
    from deconflict.experiments.problems.base import TrainingRun

    data = problem.load(config)
    model = problem.model_for(config, problem.tasks(config), data, 0)
    run = TrainingRun(problem, config, problem.tasks(config), 0, data, model,
                      deconflict.get("mean"))
    whole = problem.validation_losses(run)
    small = problem.validation_losses(run, batch_size=7)  # size-weighted batch means
    with torch.no_grad():
        model.eval()
        expected = torch.stack(problem.losses(model(data.validation.inputs)[1],
                                              data.validation.targets, problem.tasks(config)))
    assert torch.allclose(whole, expected, rtol=1e-5, atol=0.0)
    assert torch.allclose(small, expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("stop_after", [3, 38])
def test_early_stopping_state_survives_a_checkpoint_and_resume(stop_after, tmp_path,
                                                               monkeypatch):
    """Killed after a checkpoint (before and after the best epoch was found) and resumed, a run
    with early stopping ends as an uninterrupted one: same stop, same best weights."""
    from deconflict.experiments.problems import base

    # 5 steps per epoch; lr 2 oscillates: the best epoch is 7, the run stops after epoch 9,
    # so step 3 is before any best epoch and step 38 after it was found.
    problem, config = _digits(epochs=12, patience=2, lr=2.0, batch_size=64)
    factory = lambda: deconflict.get("mean")  # noqa: E731
    uninterrupted = problem.train(factory, config, 0, CPU)
    assert uninterrupted.statistics["best_epoch"] < uninterrupted.statistics["epochs_run"] < 12
    assert uninterrupted.statistics["steps"] > 38

    saves: list[int] = []
    real_save = base.save_torch
    plan = base.Checkpointing(tmp_path / "run.ckpt", 1)
    monkeypatch.setattr(base, "save_torch", save_then_die(real_save, stop_after, saves))
    with pytest.raises(KilledError):
        problem.train(factory, config, 0, CPU, checkpoint=plan)
    monkeypatch.setattr(base, "save_torch", real_save)
    resumed = problem.train(factory, config, 0, CPU,
                            checkpoint=base.Checkpointing(plan.path, 1, resume=True))
    assert resumed.metrics == uninterrupted.metrics
    strip = {"train_seconds"}
    assert ({k: v for k, v in resumed.statistics.items() if k not in strip}
            == {k: v for k, v in uninterrupted.statistics.items() if k not in strip})
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(),
                                 uninterrupted.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
