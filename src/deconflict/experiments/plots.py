"""Plots of experiment results (matplotlib, no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import LineCollection

from ..io import save_figure
from .toy2d import PARETO_X, PARETO_Y, average_loss_grid


def plot_toy_trajectories(
    trajectories: Mapping[str, np.ndarray], path: str | Path, *, limit: float = 11.0
) -> Path:
    """One panel per method: trajectories (red to yellow along time) over the mean-loss contour.

    ``trajectories`` maps a method label to points of shape (starts, recorded steps, 2).
    Conventions of the CAGrad code: start points as black dots, the Pareto set as a gray line.
    """
    X, Y, Z = average_loss_grid(limit)
    count = len(trajectories)
    columns = min(count, 5)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows),
                                squeeze=False, sharex=True, sharey=True)
    for axis, (label, paths) in zip(axes.flat, trajectories.items(), strict=False):
        axis.contourf(X, Y, Z, levels=30, cmap="Blues_r", alpha=0.55)
        axis.contour(X, Y, Z, levels=15, colors="white", linewidths=0.3)
        axis.plot(PARETO_X, (PARETO_Y, PARETO_Y), color="gray", linewidth=3, alpha=0.9,
                  solid_capstyle="round")
        for path_points in paths:
            segments = np.stack([path_points[:-1], path_points[1:]], axis=1)
            lines = LineCollection(segments, cmap="autumn", linewidth=2)
            lines.set_array(np.linspace(0.0, 1.0, len(segments)))
            axis.add_collection(lines)
            axis.scatter(*path_points[0], color="black", s=18, zorder=3)
            axis.scatter(*path_points[-1], color="gold", edgecolor="black", s=22, zorder=4,
                         marker="*")
        axis.set_title(label, fontsize=10)
        axis.set_xlim(-limit, limit)
        axis.set_ylim(-limit, limit)
        axis.set_aspect("equal")
    for axis in list(axes.flat)[count:]:
        axis.set_visible(False)
    figure.tight_layout()
    try:
        return save_figure(figure, path, dpi=110)
    finally:
        plt.close(figure)


def plot_sweep(result: Any, option: str, path: str | Path, title: str,
               pair: tuple[int, int] = (0, 1)) -> Path:
    """Left: each task metric against the swept option. Right (two or more tasks): the values
    in the plane of two task metrics (oriented to be maximized), the Pareto front drawn."""
    metrics = result.metrics
    numeric = all(isinstance(v, (int, float)) for v in result.values)
    x = np.array(result.values, dtype=float) if numeric else np.arange(len(result.values))
    panels = 2 if len(metrics) >= 2 else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    left = axes[0, 0]
    for metric in metrics:
        y = np.array([row[metric.name] for row in result.means])
        left.plot(x, y, marker="o", label=metric.name)
    left.set_xlabel(option if numeric else f"{option} (index)")
    left.set_ylabel("metric (test)")
    left.legend(fontsize=8)
    left.set_title(title, fontsize=10)
    if panels == 2:
        a, b = (metrics[pair[0]], metrics[pair[1]])
        sign = [1.0 if m.higher_is_better else -1.0 for m in (a, b)]
        points = np.array([[sign[0] * row[a.name], sign[1] * row[b.name]]
                           for row in result.means])
        right = axes[0, 1]
        right.scatter(points[:, 0], points[:, 1], c=x, cmap="viridis", zorder=3)
        for value, (px, py) in zip(result.values, points, strict=True):
            shown = "/".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"
            right.annotate(shown, (px, py), fontsize=7, xytext=(3, 3),
                           textcoords="offset points")
        front = sorted(result.front, key=lambda k: points[k, 0])
        if front:
            right.plot(points[front, 0], points[front, 1], color="crimson", linewidth=1.5,
                       label="Pareto front", zorder=2)
            right.legend(fontsize=8)
        right.set_xlabel(("" if sign[0] > 0 else "-") + a.name)
        right.set_ylabel(("" if sign[1] > 0 else "-") + b.name)
        right.set_title(f"hypervolume (all task metrics) {result.hypervolume:.4g}", fontsize=10)
    figure.tight_layout()
    try:
        return save_figure(figure, path, dpi=110)
    finally:
        plt.close(figure)
