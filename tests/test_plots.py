"""Every PNG the commands write explains itself: axis labels, legends, titles naming their metrics,
and the sweep's front is the Pareto front of the plotted pair (each metric in its direction)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import LineCollection

from deconflict.diagnostics.plots import (
    cosine_histograms_figure,
    layer_heatmap_figure,
    plot_cosine_histograms,
    plot_layer_heatmap,
)
from deconflict.errors import InvalidOptionError
from deconflict.experiments.plots import plot_sweep, sweep_figure, toy_trajectories_figure
from deconflict.experiments.problems.base import Metric
from deconflict.experiments.report import (
    SweepResult,
    hypervolume_lines,
    pareto_of,
    plotted_pair,
    sweep_csv,
)

EPS = np.finfo(np.float64).eps


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------------ helpers
def assert_labelled(axis) -> None:
    """Both axes of a panel say what they show."""
    assert axis.get_xlabel().strip(), f"panel {axis.get_title()!r} has no x label"
    assert axis.get_ylabel().strip(), f"panel {axis.get_title()!r} has no y label"


def legend_texts(legend) -> list[str]:
    assert legend is not None, "no legend"
    return [text.get_text() for text in legend.get_texts()]


def colorbar_labels(figure) -> set[str]:
    """The labels of the figure's colour bars (axes that matplotlib made for a colorbar)."""
    return {axis.get_ylabel() for axis in figure.axes if axis.get_label() == "<colorbar>"}


def line_labelled(axis, label: str):
    lines = [line for line in axis.get_lines() if line.get_label() == label]
    found = [line.get_label() for line in axis.get_lines()]
    assert len(lines) == 1, f"expected one line {label!r}, found {found}"
    return lines[0]


def sweep_result(values, rows, metrics) -> SweepResult:
    front = pareto_of(rows, metrics)
    return SweepResult(list(values), rows, front.indices, front.hypervolume, front.reference,
                       tuple(metrics))


def joined_points(axis, front_label: str) -> list[tuple[float, float]]:
    line = line_labelled(axis, front_label)
    return list(zip(line.get_xdata().tolist(), line.get_ydata().tolist(), strict=True))


# --------------------------------------------------------------------------------- toy / demo
def _trajectories(count: int, starts: int, points: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"method {k}": rng.uniform(-9, 9, (starts, points, 2)) for k in range(count)}


def test_toy_trajectories_label_axes_and_explain_every_mark():
    figure = toy_trajectories_figure(_trajectories(3, 2, 6), steps=100, title="toy")
    panels = [axis for axis in figure.axes if axis.get_visible() and axis.get_title()]
    assert [axis.get_title() for axis in panels] == ["method 0", "method 1", "method 2"]
    for axis in panels:
        assert_labelled(axis)
        assert (axis.get_xlabel(), axis.get_ylabel()) == ("x1", "x2")
    texts = legend_texts(figure.legends[0])
    assert texts[:2] == ["start point", "end point (step 100)"]
    assert any(text.startswith("Pareto set") for text in texts)
    assert any("colour: step" in text for text in texts)
    assert colorbar_labels(figure) == {"optimizer step", "mean loss (L1 + L2) / 2"}
    assert figure.get_suptitle() == "toy"


def test_toy_trajectory_colour_is_the_step_of_each_segment():
    # 90 steps recorded every 20 and after the last: points at steps 0, 20, 40, 60, 80, 90.
    figure = toy_trajectories_figure(_trajectories(1, 1, 6), steps=90, record_every=20)
    (lines,) = [c for c in figure.axes[0].collections if isinstance(c, LineCollection)]
    assert lines.get_array().tolist() == [20, 40, 60, 80, 90]
    assert lines.norm.vmin == 0 and lines.norm.vmax == 90


def test_toy_trajectories_without_steps_still_explain_the_colour():
    figure = toy_trajectories_figure(_trajectories(1, 5, 4))  # five start points, no step count
    assert "recorded point" in colorbar_labels(figure)
    assert "end point" in legend_texts(figure.legends[0])
    with pytest.raises(ValueError, match="no trajectories"):
        toy_trajectories_figure({})


# ------------------------------------------------------------------------------------ sweep
LOWER = (Metric("L1", "a", False), Metric("L2", "b", False))
MIXED = (Metric("acc", "a", True), Metric("err", "b", False))


def test_sweep_front_joins_exactly_the_non_dominated_points_lower_is_better():
    rows = [{"L1": a, "L2": b} for a, b in ((2.0, 1.0), (1.5, 1.5), (1.0, 2.5), (1.6, 2.0),
                                             (0.5, 3.0), (2.5, 2.5))]
    result = sweep_result([-2, -1, 0, 1, 2, 3], rows, LOWER)
    figure = sweep_figure(result, "alpha", "toy2d: gradops over alpha")
    right = figure.axes[1]
    # (1.6, 2.0) is dominated by (1.5, 1.5), (2.5, 2.5) by all; joined along L1 from worst.
    assert joined_points(right, "Pareto front of (L1, L2)") == [
        (2.0, 1.0), (1.5, 1.5), (1.0, 2.5), (0.5, 3.0)]
    assert right.xaxis_inverted() and right.yaxis_inverted()  # up and right are better
    assert_labelled(right)
    assert "lower is better" in right.get_xlabel() and right.get_xlabel().startswith("L1")
    assert right.get_ylabel().startswith("L2")
    assert right.get_title().startswith("Pareto front of (L1, L2): hypervolume ")
    assert legend_texts(right.get_legend()) == ["one point per alpha value (mean over seeds)",
                                                "Pareto front of (L1, L2)"]
    assert "alpha" in colorbar_labels(figure)


def test_sweep_front_respects_each_metrics_direction():
    # acc higher is better, err lower: (2, 1) dominates (1, 1) and (2, 2); (3, 3) has the best
    # acc. Were both maximized, only (3, 3) would be on the front.
    rows = [{"acc": a, "err": e} for a, e in ((1.0, 1.0), (2.0, 2.0), (3.0, 3.0), (2.0, 1.0))]
    figure = sweep_figure(sweep_result([0, 1, 2, 3], rows, MIXED), "c", "mixed")
    right = figure.axes[1]
    assert joined_points(right, "Pareto front of (acc, err)") == [(2.0, 1.0), (3.0, 3.0)]
    assert not right.xaxis_inverted() and right.yaxis_inverted()
    assert "higher is better" in right.get_xlabel() and "lower is better" in right.get_ylabel()


def test_sweep_front_is_that_of_the_plotted_pair_not_of_all_metrics():
    metrics = tuple(Metric(name, name, True) for name in ("m1", "m2", "m3"))
    # Every point is on the front over (m1, m2, m3) (p0 has the best m3), but in the plotted
    # plane (m1, m2) p0 = (1, 1) is dominated by p1 = (2, 2).
    rows = [{"m1": 1.0, "m2": 1.0, "m3": 5.0}, {"m1": 2.0, "m2": 2.0, "m3": 0.0},
            {"m1": 3.0, "m2": 0.0, "m3": 0.0}]
    result = sweep_result([0.0, 0.5, 1.0], rows, metrics)
    assert result.front == [0, 1, 2]
    right = sweep_figure(result, "alpha", "three tasks").axes[1]
    assert joined_points(right, "Pareto front of (m1, m2)") == [(2.0, 2.0), (3.0, 0.0)]
    # By hand: reference (1 - 0.05 * 2, 0 - 0.05 * 2) = (0.9, -0.1); the front dominates
    # [0.9, 2] x [-0.1, 2] and [2, 3] x [-0.1, 0]: 1.1 * 2.1 + 1 * 0.1 = 2.41. A dozen
    # roundings, each within eps / 2 relative.
    pair = result.front_over(metrics[:2])
    assert pair.indices == [1, 2]
    assert math.isclose(pair.hypervolume, 2.41, rel_tol=16 * EPS)
    title = right.get_title()
    assert title.startswith(f"Pareto front of (m1, m2): hypervolume {pair.hypervolume:.4g}")
    assert f"over all task metrics (m1, m2, m3): hypervolume {result.hypervolume:.4g}" in title
    # --pair by name picks the plane, and the front follows it.
    right = sweep_figure(result, "alpha", "three tasks", ("m1", "m3")).axes[1]
    assert joined_points(right, "Pareto front of (m1, m3)") == [(1.0, 5.0), (3.0, 0.0)]
    assert right.get_title().startswith("Pareto front of (m1, m3)")


def test_sweep_left_panel_names_metrics_and_their_directions():
    rows = [{"acc": 0.5 + 0.1 * k, "err": 1.0 - 0.1 * k} for k in range(3)]
    figure = sweep_figure(sweep_result([1, 2, 3], rows, MIXED), "alpha", "census: over alpha")
    left = figure.axes[0]
    assert_labelled(left)
    assert left.get_xlabel() == "alpha" and left.get_title() == "census: over alpha"
    assert legend_texts(left.get_legend()) == ["acc (higher is better)", "err (lower is better)"]


def test_sweep_of_weight_vectors_shows_the_values_and_skips_nan_rows(tmp_path):
    metrics = (Metric("converged_xor", "xor", True), Metric("epochs_xor", "xor", False),
               Metric("converged_and", "and", True), Metric("epochs_and", "and", False))
    nan = math.nan
    rows = [{"converged_xor": 1.0, "epochs_xor": 30.0, "converged_and": 0.0, "epochs_and": nan},
            {"converged_xor": 1.0, "epochs_xor": 20.0, "converged_and": 1.0, "epochs_and": 12.0},
            {"converged_xor": 0.0, "epochs_xor": nan, "converged_and": 1.0, "epochs_and": 8.0}]
    result = sweep_result([[0.5, 1.5], [1.0, 1.0], [1.5, 0.5]], rows, metrics)
    assert result.front == [1]  # the only row finite in all four metrics
    figure = sweep_figure(result, "weights", "xor-and")
    left, right = figure.axes[0], figure.axes[1]
    assert [t.get_text() for t in left.get_xticklabels()] == ["0.5/1.5", "1/1", "1.5/0.5"]
    # Default pair: one metric of each task, not converged_xor against epochs_xor.
    assert joined_points(right, "Pareto front of (converged_xor, converged_and)") == [(1.0, 1.0)]
    assert_labelled(right)
    path = plot_sweep(result, "weights", tmp_path / "sweep.png", "xor-and")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_without_finite_values_says_so_and_coincident_values_share_a_label():
    metrics = (Metric("c_x", "x", True), Metric("e_x", "x", False), Metric("c_y", "y", True))
    rows = [{"c_x": 0.0, "e_x": math.nan, "c_y": 0.0} for _ in range(3)]
    figure = sweep_figure(sweep_result([-1.0, 0.0, 1.0], rows, metrics), "alpha", "xor-and")
    left, right = figure.axes[0], figure.axes[1]
    assert "e_x (lower is better, no finite value)" in legend_texts(left.get_legend())
    assert "over all task metrics (c_x, e_x, c_y): no value finite in all" in \
        right.get_title().replace("\n", " ")
    assert [text.get_text() for text in right.texts] == ["-1, 0, 1"]


def test_plotted_pair_default_names_and_errors():
    metrics = (Metric("converged", "all", True), Metric("c_x", "x", True),
               Metric("e_x", "x", False), Metric("c_y", "y", True))
    assert plotted_pair(metrics) == (metrics[0], metrics[1])
    assert plotted_pair(metrics[1:]) == (metrics[1], metrics[3])
    assert plotted_pair(metrics, (2, 3)) == (metrics[2], metrics[3])
    assert plotted_pair(metrics, ("c_y", "e_x")) == (metrics[3], metrics[2])
    with pytest.raises(InvalidOptionError, match="'nosuch' is not a task metric"):
        plotted_pair(metrics, ("nosuch", "c_x"))
    with pytest.raises(InvalidOptionError, match="two different"):
        plotted_pair(metrics, ("c_x", "c_x"))
    with pytest.raises(InvalidOptionError, match="two task metrics"):
        plotted_pair(metrics[:1])


def test_every_statement_of_a_hypervolume_names_its_metrics():
    metrics = tuple(Metric(name, name, True) for name in ("m1", "m2", "m3"))
    rows = [{"m1": 1.0, "m2": 1.0, "m3": 5.0}, {"m1": 2.0, "m2": 2.0, "m3": 0.0}]
    result = sweep_result([0.0, 1.0], rows, metrics)
    lines = hypervolume_lines(result, ("m1", "m2"))
    stated = [line for line in lines if "Hypervolume" in line]
    assert len(stated) == 2
    assert stated[0].startswith("Hypervolume of the Pareto front over (m1, m2, m3): ")
    assert stated[1].startswith("Plotted pair: Hypervolume of the Pareto front over (m1, m2): ")
    assert "Front column: * marks the values on the Pareto front over (m1, m2, m3)." in lines
    # The reference point is given in the metrics' own units: 5% of the range below the worst.
    assert "reference point m1 = 0.95, m2 = 0.95, m3 = -0.25" in stated[0]
    assert sweep_csv(result, "alpha", metrics).splitlines()[0] == \
        "alpha,m1,m2,m3,on_front[m1;m2;m3]"
    # Two task metrics: the plotted pair is all of them, stated once.
    two = sweep_result([0.0, 1.0], [{"L1": 1.0, "L2": 2.0}, {"L1": 2.0, "L2": 1.0}], LOWER)
    assert sum("Hypervolume" in line for line in hypervolume_lines(two)) == 1
    empty = sweep_result([0.0], [{"L1": math.nan, "L2": 1.0}], LOWER)
    assert hypervolume_lines(empty)[-1] == \
        "No value has finite (L1, L2): no Pareto front, no hypervolume."


def test_reference_is_in_the_metrics_units_for_lower_is_better():
    rows = [{"L1": 1.0, "L2": 3.0}, {"L1": 3.0, "L2": 1.0}]
    front = pareto_of(rows, LOWER)
    # Worst L1 = 3, range 2: reference 3 + 0.1 (and so for L2); area = 2.1^2 - 2^2 = 0.41.
    assert front.indices == [0, 1]
    assert np.allclose(front.reference, [3.1, 3.1], rtol=4 * EPS, atol=0)
    assert math.isclose(front.hypervolume, 2.1 * 2.1 - 2.0 * 2.0, rel_tol=64 * EPS)


# ------------------------------------------------------------------------------ diagnostics
def test_cosine_histograms_label_axes_and_give_each_runs_conflict_fraction():
    edges = np.linspace(-1.0, 1.0, 5)  # bins [-1, -.5), [-.5, 0), [0, .5), [.5, 1]
    figure = cosine_histograms_figure({"sum": (edges, [1, 1, 2, 0]),
                                       "gradops": (edges, [0, 0, 0, 4]),
                                       "empty": (edges, [0, 0, 0, 0])}, title="digits")
    axis = figure.axes[0]
    assert_labelled(axis)
    assert "cos(g_i, g_j)" in axis.get_xlabel() and "density" in axis.get_ylabel()
    assert axis.get_title() == "digits"
    assert legend_texts(axis.get_legend()) == [
        "sum: 50.0% of 4 below 0", "gradops: 0.0% of 4 below 0", "empty: no pairs measured",
        "cos = 0 (conflict to the left)"]
    # Densities: counts / (total * bin width 0.5): sum's outline is 0.5, 0.5, 1, 0.
    (outline, *_) = axis.patches
    assert np.array_equal(outline.get_data().values, [0.5, 0.5, 1.0, 0.0])


def test_layer_heatmap_labels_rows_columns_and_colour():
    cosines = {"features.0": np.array([[-1.0], [1.0], [-1.0], [-1.0]]),
               "head": np.array([[1.0], [1.0], [1.0], [-1.0]])}
    figure = layer_heatmap_figure(cosines, windows=2, title="digits, sum")
    axis = figure.axes[0]
    assert_labelled(axis)
    assert axis.get_ylabel() == "shared layer"
    assert axis.get_xlabel() == "measured training step (2 windows of 2 steps)"
    assert [t.get_text() for t in axis.get_yticklabels()] == ["features.0", "head"]
    assert colorbar_labels(figure) == {"fraction of cosines < 0"}
    assert np.array_equal(axis.images[0].get_array(), [[0.5, 1.0], [0.0, 0.5]])


def test_layer_heatmap_with_unequal_layers_uses_a_fraction_axis_and_explains_blanks():
    cosines = {"a": -np.ones((6, 1)), "b": -np.ones((1, 1))}
    figure = layer_heatmap_figure(cosines, windows=3)
    axis = figure.axes[0]
    assert axis.get_xlabel() == "fraction of each layer's measured steps (3 windows)"
    one_per_step = layer_heatmap_figure({"a": -np.ones((3, 1))}, windows=40)
    assert one_per_step.axes[0].get_xlabel() == "measured training step"
    assert colorbar_labels(figure) == {"fraction of cosines < 0\n(white: no gradient)"}


def test_diagnostic_plots_are_written(tmp_path):
    edges = np.linspace(-1.0, 1.0, 5)
    histogram = plot_cosine_histograms({"sum": (edges, [1, 1, 2, 0])}, tmp_path / "h.png")
    heatmap = plot_layer_heatmap({"x": np.array([[-0.5], [0.5]])}, tmp_path / "m.png")
    for path in (histogram, heatmap):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
