"""Conflict diagnostics: per-step quantities by hand, the monitor against a direct computation on
a small network in every engine mode, CSV and TensorBoard output, and Recon's S-conflict scores
on crafted per-layer gradients."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from properties import manual_jacobian
from torch import nn

import deconflict
from deconflict.diagnostics import ConflictMonitor, step_conflicts
from deconflict.diagnostics.plots import plot_cosine_histograms, plot_layer_heatmap
from deconflict.errors import InvalidOptionError
from deconflict.recon.scores import conflict_scores, top_layers


def _record(J: np.ndarray, c: np.ndarray, layers: dict[str, slice] | None = None,
            diagnostics: dict | None = None) -> deconflict.StepRecord:
    """A StepRecord as the engine would write it for Jacobian J and weights c."""
    J = torch.from_numpy(np.asarray(J, dtype=np.float64))
    c = torch.from_numpy(np.asarray(c, dtype=np.float64))
    layers = layers or {"all": slice(0, J.shape[1])}
    M = J @ J.T
    return deconflict.StepRecord(
        weights=c, losses=torch.ones(len(c), dtype=torch.float64), gramian=M,
        diagnostics=diagnostics or {},
        layer_gramians={name: J[:, cols] @ J[:, cols].T for name, cols in layers.items()},
        update_products=M @ c, update_sq_norm=float(c @ M @ c))


def test_step_conflicts_by_hand():
    """g1 = (1, 0), g2 = (-1, 1): cos = -1/sqrt(2); the sum D = (0, 1) serves both (weak
    non-conflict) while the original pair conflicts (strong conflict for sum). Per layer
    (one coordinate each): cosines -1 and 0 (g1 has no gradient in the second)."""
    record = _record([[1.0, 0.0], [-1.0, 1.0]], [1.0, 1.0],
                     {"first": slice(0, 1), "second": slice(1, 2)})
    result = step_conflicts(record, scales_task_gradients=True)
    assert result.cosines[0, 1] == pytest.approx(-1 / np.sqrt(2), abs=1e-15)
    assert result.conflicting_pairs == 1
    assert result.weak_conflict is False
    assert result.strong_conflict is True
    assert result.layer_cosines["first"][0, 1] == -1.0
    assert result.layer_cosines["second"][0, 1] == 0.0  # a zero gradient has cosine 0
    # p_i = g_i . D / ||g_i||: 0 for task 0, 1/sqrt(2) for task 1.
    np.testing.assert_allclose(result.update_projections, [0.0, 1 / np.sqrt(2)], atol=1e-15)


def test_strong_conflict_needs_the_modified_gradients():
    record = _record([[1.0, 0.0], [-1.0, 1.0]], [1.0, 1.0])
    assert step_conflicts(record, scales_task_gradients=False).strong_conflict is None
    # PCGrad at T = 2 projects each gradient off the other: C rows give g'_1 = (0.5, 0.5)
    # and g'_2 = (0, 1), which conflict with neither original.
    C = np.array([[1.0, 0.5], [1.0, 1.0]])
    record = _record([[1.0, 0.0], [-1.0, 1.0]], C.sum(axis=0),
                     diagnostics={"projection_coefficients": torch.from_numpy(C)})
    assert step_conflicts(record).strong_conflict is False
    # The weak test: D = -g1 conflicts with g1.
    assert step_conflicts(_record([[1.0, 0.0], [0.0, 1.0]], [-1.0, 0.0])).weak_conflict is True


def test_no_gramian_no_diagnostics():
    record = deconflict.StepRecord(weights=torch.ones(2, dtype=torch.float64),
                                   losses=torch.ones(2), gramian=None)
    assert step_conflicts(record) is None
    monitor = ConflictMonitor()
    assert monitor.observe(record) is None
    assert monitor.summary() == {"steps": 1, "measured_steps": 0}


class _Net(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(tasks))

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [((head(z).squeeze(-1) - y[:, k]) ** 2).mean()
                for k, head in enumerate(self.heads)]


def _cosines(J: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(J, axis=1)
    return (J @ J.T) / np.outer(norms, norms)


@pytest.mark.parametrize(("method", "mode"), [
    ("gradops", "sequential"), ("pcgrad", "batched"), ("mgda", "gramian"), ("sum", "sequential"),
    ("gradvac", "sequential"), ("graddrop", "sequential"),
])
def test_monitor_matches_a_direct_computation(method, mode):
    """Over a few Adam steps, the monitor's whole-model and per-layer cosines, its conflicting
    pair counts and its update projections equal those computed from the per-task gradients
    (autograd, one loss at a time) and the update actually written into .grad."""
    torch.manual_seed(0)
    net = _Net()
    if mode == "gramian":
        deconflict.track(net.trunk)
    instance = deconflict.get(method, **({"seed": 0} if method in ("pcgrad", "graddrop")
                                         else {}))
    monitor = ConflictMonitor(instance, task_names=["a", "b", "c"])
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    params = list(net.trunk.parameters())
    layers = {"0": slice(0, 42), "2": slice(42, 90)}  # Linear(5, 7): 35 + 7; Linear(7, 6): 48
    expected_pairs, expected_layers, expected_projections, expected_conflicts = [], [], [], []
    for _ in range(4):
        x, y = torch.randn(16, 5), torch.randn(16, 3)
        losses = net.losses(x, y)
        J = manual_jacobian(losses, params).double().numpy()
        optimizer.zero_grad()
        record = deconflict.backward(losses, net.trunk, instance, mode=mode,
                                     compute_gramian=True if method == "sum" else None)
        monitor.observe(record)
        D = torch.cat([p.grad.reshape(-1) for p in params]).double().numpy()
        K = _cosines(J)
        rows, cols = np.triu_indices(3, k=1)
        expected_pairs.append(K[rows, cols])
        expected_conflicts.append(int((K[rows, cols] < 0).sum()))
        expected_layers.append({name: _cosines(J[:, s])[rows, cols] for name, s in
                                layers.items()})
        expected_projections.append(J @ D / np.linalg.norm(J, axis=1))
        optimizer.step()
    np.testing.assert_allclose(monitor.pair_cosines(), np.array(expected_pairs), atol=1e-6)
    for name in layers:
        np.testing.assert_allclose(monitor.layer_cosines()[name],
                                   np.array([e[name] for e in expected_layers]), atol=1e-6)
    np.testing.assert_allclose(np.array(monitor._projections), np.array(expected_projections),
                               rtol=1e-5, atol=1e-7)
    summary = monitor.summary()
    assert summary["mean_conflicting_pairs"] == pytest.approx(np.mean(expected_conflicts))
    assert summary["measured_steps"] == 4
    if method == "gradops":  # GradOPS's guarantee, seen by the monitor
        assert summary["strong_non_conflict_fraction"] == 1.0
        assert summary["weak_non_conflict_fraction"] == 1.0
    if method == "graddrop":  # modifies gradients without reporting them
        assert "strong_non_conflict_fraction" not in summary


def test_layer_gramians_add_up_to_the_gramian():
    torch.manual_seed(1)
    net = _Net()
    losses = net.losses(torch.randn(8, 5), torch.randn(8, 3))
    record = deconflict.backward(losses, net.trunk, "upgrad")
    total = sum(record.layer_gramians.values())
    torch.testing.assert_close(total, record.gramian, rtol=1e-12, atol=1e-14)
    assert list(record.layer_gramians) == ["0", "2"]


def test_csv_holds_what_the_monitor_measured(tmp_path):
    monitor = ConflictMonitor(deconflict.Sum(), task_names=["x", "y"], every=2)
    for k in range(5):
        J = np.array([[1.0, 0.5 * k], [-1.0 + 0.4 * k, 1.0]])
        monitor.observe(_record(J, [1.0, 1.0], {"u": slice(0, 1), "v": slice(1, 2)}))
    assert monitor.measured == [1, 3, 5]
    paths = monitor.write_csv(tmp_path / "out")
    with open(paths["steps"]) as handle:
        steps = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in steps] == [1, 3, 5]
    np.testing.assert_allclose([float(row["cos_x-y"]) for row in steps],
                               monitor.pair_cosines()[:, 0], rtol=1e-5)
    # g1 . g2 = -1 + 0.4 k + 0.5 k: -1 at k = 0, 0.8 at k = 2, 2.6 at k = 4.
    assert [row["strong_conflict"] for row in steps] == ["1", "0", "0"]
    with open(paths["layers"]) as handle:
        layers = list(csv.DictReader(handle))
    assert {(row["step"], row["layer"]) for row in layers} == {
        (str(s), name) for s in (1, 3, 5) for name in ("u", "v")}
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = ConflictMonitor(deconflict.Sum(), task_names=["x", "y"],
                              tensorboard=tmp_path / "tb")
    for k in range(3):
        monitor.observe(_record([[1.0, 0.0], [-1.0 + k, 1.0]], [1.0, 1.0]))
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    pairs = [event.value for event in events.Scalars("conflict/conflicting_pairs")]
    assert pairs == [1.0, 0.0, 0.0]
    cosines = [event.value for event in events.Scalars("cosine/x-y")]
    np.testing.assert_allclose(cosines, monitor.pair_cosines()[:, 0], rtol=1e-6)


def test_monitor_rejects_bad_settings():
    with pytest.raises(InvalidOptionError, match="every"):
        ConflictMonitor(every=0)
    monitor = ConflictMonitor(task_names=["only one"])
    with pytest.raises(InvalidOptionError, match="task names"):
        monitor.observe(_record(np.eye(2), [1.0, 1.0]))


def test_s_conflict_scores_on_crafted_layer_gradients():
    """Three tasks, two layers, three steps. Layer "a": gradients (1, 0), (-1, 0.2), (0, 1) —
    pair (0, 1) at cos -0.98, the others >= 0; layer "b": all at 90 degrees or aligned, except
    one step where task 2 flips to cos -0.05 with task 0. S = -0.1 counts only layer a's
    pair, once per step; S = 0 also counts layer b's mild conflict."""
    a = np.array([[1.0, 0.0], [-1.0, 0.2], [0.0, 1.0]])
    b_plain = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b_mild = np.array([[1.0, 0.0], [0.0, 1.0], [-0.05, np.sqrt(1 - 0.05**2)]])
    monitor = ConflictMonitor(deconflict.Sum())
    for b in (b_plain, b_mild, b_plain):
        J = np.hstack([a, b])
        monitor.observe(_record(J, np.ones(3), {"a": slice(0, 2), "b": slice(2, 4)}))
    cosines = monitor.layer_cosines()
    assert cosines["a"].shape == (3, 3)
    assert conflict_scores(cosines, -0.1) == {"a": 3, "b": 0}
    assert conflict_scores(cosines, 0.0) == {"a": 3, "b": 1}
    assert top_layers(conflict_scores(cosines, 0.0), 1) == ["a"]
    assert top_layers(conflict_scores(cosines, 0.0), 5) == ["a", "b"]
    assert top_layers(conflict_scores(cosines, -0.1), 5) == ["a"]  # never conflicting: left


def test_scores_reject_bad_thresholds_and_ties_keep_layer_order():
    with pytest.raises(InvalidOptionError, match="S must be in"):
        conflict_scores({"a": np.zeros((1, 1))}, 0.5)
    with pytest.raises(InvalidOptionError, match="topk"):
        top_layers({"a": 1}, 0)
    assert top_layers({"x": 2, "y": 5, "z": 2}, 3) == ["y", "x", "z"]


def test_plots_are_written(tmp_path):
    monitor = ConflictMonitor(deconflict.Sum())
    for k in range(6):
        monitor.observe(_record([[1.0, 0.1 * k], [-0.5, 1.0]], [1.0, 1.0],
                                {"u": slice(0, 1), "v": slice(1, 2)}))
    histogram = plot_cosine_histograms({"sum": monitor.cosine_histogram()},
                                       tmp_path / "h.png")
    heatmap = plot_layer_heatmap(monitor.layer_cosines(), tmp_path / "m.png", windows=3)
    assert histogram.stat().st_size > 1000 and heatmap.stat().st_size > 1000
