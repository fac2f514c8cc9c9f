"""Plots of experiment results (matplotlib, no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

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
