"""Plots of experiment results (matplotlib, no display needed).

Each plot is built by a ``*_figure`` function that returns the matplotlib Figure (what the
tests inspect) and saved by the ``plot_*`` function of the same name (what the commands call).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..io import save_figure
from .report import SweepResult, plotted_pair
from .toy2d import PARETO_X, PARETO_Y, average_loss_grid

TOY_TITLE = "The 2-D toy problem (CAGrad paper, Section 5.1): trajectories over the mean loss"


def _save(figure: Figure, path: str | Path) -> Path:
    try:
        return save_figure(figure, path, dpi=110)
    finally:
        plt.close(figure)


def _recorded_steps(count: int, steps: int | None, record_every: int) -> np.ndarray:
    """The step number of each recorded point: every ``record_every`` steps and the last."""
    if steps is None:
        return np.arange(count, dtype=float)
    numbers = np.minimum(np.arange(count) * record_every, steps)
    if count < 2 or numbers[-1] != steps or numbers[-2] == steps:
        return np.linspace(0.0, steps, count)  # recorded otherwise: spread evenly
    return numbers.astype(float)


def toy_trajectories_figure(trajectories: Mapping[str, np.ndarray], *, limit: float = 11.0,
                            steps: int | None = None, record_every: int = 20,
                            title: str = TOY_TITLE) -> Figure:
    """One panel per method: trajectories over the contours of the mean loss (L1 + L2) / 2.

    ``trajectories`` maps a method label to points of shape (starts, recorded points, 2),
    recorded every ``record_every`` of ``steps`` optimizer steps and after the last (as
    ``toy2d.optimize`` records them). Start points are black dots, end points gold stars, the
    Pareto set (x2 = -8.3552, |x1| <= 7) a gray segment; a trajectory's colour gives the step
    (colour bar), the background the mean loss (colour bar).
    """
    if not trajectories:
        raise ValueError("no trajectories to plot")
    X, Y, Z = average_loss_grid(limit)
    count = len(trajectories)
    columns = min(count, 5)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.0 * columns + 1.6, 3.0 * rows + 1.2),
                                squeeze=False, sharex=True, sharey=True, layout="constrained")
    recorded = max(np.asarray(paths).shape[1] for paths in trajectories.values())
    numbers = _recorded_steps(recorded, steps, record_every)
    time_norm = Normalize(0.0, float(numbers[-1]) if numbers[-1] > 0 else 1.0)
    loss_levels = MaxNLocator(30).tick_values(Z.min(), Z.max())
    contours = None
    for axis, (label, paths) in zip(axes.flat, trajectories.items(), strict=False):
        contours = axis.contourf(X, Y, Z, levels=loss_levels, cmap="Blues_r", alpha=0.55)
        axis.contour(X, Y, Z, levels=loss_levels[::2], colors="white", linewidths=0.3)
        axis.plot(PARETO_X, (PARETO_Y, PARETO_Y), color="gray", linewidth=3, alpha=0.9,
                  solid_capstyle="round")
        for path_points in np.asarray(paths, dtype=float):
            segments = np.stack([path_points[:-1], path_points[1:]], axis=1)
            lines = LineCollection(list(segments), cmap="autumn", norm=time_norm, linewidth=2)
            lines.set_array(numbers[1:len(path_points)])  # a segment's colour: its end's step
            axis.add_collection(lines)
            axis.scatter(*path_points[0], color="black", s=18, zorder=3)
            axis.scatter(*path_points[-1], color="gold", edgecolor="black", s=40, zorder=4,
                         marker="*")
        axis.set_title(label, fontsize=10)
        axis.set_xlim(-limit, limit)
        axis.set_ylim(-limit, limit)
        axis.set_aspect("equal")
        axis.set_xlabel("x1")
        axis.set_ylabel("x2")
    for axis in list(axes.flat)[count:]:
        axis.set_visible(False)
    shown = list(axes.flat)[:count]
    figure.colorbar(ScalarMappable(time_norm, "autumn"), ax=shown, shrink=0.8, pad=0.01,
                    label="optimizer step" if steps is not None else "recorded point")
    assert contours is not None  # set on the first axis: trajectories is not empty
    figure.colorbar(contours, ax=shown, shrink=0.8, pad=0.01, label="mean loss (L1 + L2) / 2")
    end = "end point" if steps is None else f"end point (step {steps:,})"
    handles = [
        Line2D([], [], linestyle="none", marker="o", color="black", markersize=5,
               label="start point"),
        Line2D([], [], linestyle="none", marker="*", markerfacecolor="gold",
               markeredgecolor="black", markersize=10, label=end),
        Line2D([], [], color="gray", linewidth=3, label="Pareto set (x2 = -8.3552, |x1| <= 7)"),
        Line2D([], [], color=plt.get_cmap("autumn")(0.5), linewidth=2,
               label="trajectory (colour: step)"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles),
                  fontsize=9, frameon=False)
    figure.suptitle(title, fontsize=11)
    return figure


def plot_toy_trajectories(trajectories: Mapping[str, np.ndarray], path: str | Path, *,
                          limit: float = 11.0, steps: int | None = None,
                          record_every: int = 20, title: str = TOY_TITLE) -> Path:
    """Save ``toy_trajectories_figure`` as ``path`` (PNG, or the format its suffix names)."""
    return _save(toy_trajectories_figure(trajectories, limit=limit, steps=steps,
                                         record_every=record_every, title=title), path)


def _direction(metric: Any) -> str:
    return "higher is better" if metric.higher_is_better else "lower is better"


def _pair_label(metric: Any) -> str:
    reversed_axis = "" if metric.higher_is_better else ", axis reversed"
    return f"{metric.name} (test, {_direction(metric)}{reversed_axis})"


def _shown(value: Any) -> str:
    return "/".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def sweep_figure(result: SweepResult, option: str, title: str,
                 pair: Sequence[int | str] | None = None) -> Figure:
    """Left: each task metric (test, mean over seeds) against the swept option. Right (two or
    more task metrics): the swept values in the plane of the pair of task metrics ``pair``
    (``report.plotted_pair``), each axis oriented so that up and right are better, and the
    Pareto front of that pair joined; the title gives its hypervolume and the metrics it
    covers (and, with more than two task metrics, the hypervolume over all of them).
    """
    metrics = result.metrics
    numeric = all(isinstance(v, (int, float)) for v in result.values)
    x = np.array(result.values, dtype=float) if numeric else np.arange(len(result.values),
                                                                        dtype=float)
    # A grid of vectors (simplex:K) is placed by position; the ticks and labels show the values.
    colour_label = option if numeric else f"position of the {option} value (as annotated)"
    panels = 2 if len(metrics) >= 2 else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.6), squeeze=False,
                                layout="constrained")
    left = axes[0, 0]
    for metric in metrics:
        y = np.array([row[metric.name] for row in result.means], dtype=float)
        missing = "" if np.isfinite(y).any() else ", no finite value"
        left.plot(x, y, marker="o", label=f"{metric.name} ({_direction(metric)}{missing})")
    left.set_xlabel(option)
    left.set_ylabel("test metric (mean over seeds)")
    left.legend(fontsize=8)
    left.set_title(title, fontsize=10)
    if not numeric:
        left.set_xticks(x, [_shown(v) for v in result.values], fontsize=7, rotation=30)
    if panels == 2:
        a, b = plotted_pair(metrics, pair)
        front = result.front_over((a, b))
        points = np.array([[row[a.name], row[b.name]] for row in result.means], dtype=float)
        right = axes[0, 1]
        scatter = right.scatter(points[:, 0], points[:, 1], c=x, cmap="viridis", zorder=3,
                                label=f"one point per {option} value (mean over seeds)")
        # Values that land on one point share one annotation instead of overprinting.
        names: dict[tuple[float, float], list[str]] = {}
        for value, (px, py) in zip(result.values, points, strict=True):
            if np.isfinite(px) and np.isfinite(py):
                names.setdefault((float(px), float(py)), []).append(_shown(value))
        for point, shown in names.items():
            right.annotate(", ".join(shown), point, fontsize=7, xytext=(3, 3),
                           textcoords="offset points")
        if front.indices:
            sign = 1.0 if a.higher_is_better else -1.0
            joined = sorted(front.indices, key=lambda k: sign * points[k, 0])
            right.plot(points[joined, 0], points[joined, 1], color="crimson", linewidth=1.5,
                       marker="o", markerfacecolor="none", markersize=10, zorder=2,
                       label=f"Pareto front of {front.names}")
        # Up and right are better on both axes: a metric to minimize runs backwards.
        if not a.higher_is_better:
            right.invert_xaxis()
        if not b.higher_is_better:
            right.invert_yaxis()
        # Values a sweep barely moves would get an offset ("1e-6+6.128") over the axis label.
        right.ticklabel_format(useOffset=False)
        right.xaxis.set_major_locator(MaxNLocator(5))
        right.set_xlabel(_pair_label(a))
        right.set_ylabel(_pair_label(b))
        bar = figure.colorbar(scatter, ax=right, label=colour_label)
        if not numeric:
            bar.set_ticks(x.tolist())
        right.legend(fontsize=8)
        heading = (f"Pareto front of {front.names}: hypervolume {front.hypervolume:.4g}"
                   if front.indices else f"no finite values of {front.names}: no front")
        if len(metrics) > 2:
            everything = result.front_over()
            heading += "\n" + textwrap.fill(
                f"over all task metrics {everything.names}: " + (
                    f"hypervolume {everything.hypervolume:.4g}" if everything.indices
                    else "no value finite in all, no hypervolume"), 75)
        right.set_title(heading, fontsize=9)
    return figure


def plot_sweep(result: SweepResult, option: str, path: str | Path, title: str,
               pair: Sequence[int | str] | None = None) -> Path:
    """Save ``sweep_figure`` as ``path``."""
    return _save(sweep_figure(result, option, title, pair), path)
