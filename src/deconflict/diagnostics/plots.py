"""Plots of conflict diagnostics (matplotlib, no display needed).

``*_figure`` functions build and return the Figure (what the tests inspect); the ``plot_*``
function of the same name saves it (what the commands call).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from ..io import save_figure

Histogram = tuple[ArrayLike, ArrayLike]  # bin edges, counts


def _save(figure: Figure, path: str | Path) -> Path:
    try:
        return save_figure(figure, path, dpi=130)
    finally:
        plt.close(figure)


def cosine_histograms_figure(histograms: Mapping[str, Histogram],
                             title: str = "Pairwise cosines of the task gradients") -> Figure:
    """The distribution of the pairwise cosines cos(g_i, g_j), i < j, one outline per method
    (Recon slides, Figure 1).

    Each histogram is normalized to a density (its area is 1), so runs of different lengths
    compare; the legend gives each run's number of (step, pair) cosines and the fraction below
    0 (the conflicting pairs, left of the dashed line).

    >>> import numpy as np
    >>> edges = np.linspace(-1.0, 1.0, 5)
    >>> figure = cosine_histograms_figure({"sum": (edges, [1, 3, 4, 2])})
    >>> [text.get_text() for text in figure.axes[0].get_legend().get_texts()][0]
    'sum: 40.0% of 10 below 0'
    >>> plt.close(figure)
    """
    figure, axis = plt.subplots(figsize=(9.0, 4.0), layout="constrained")
    # Methods with equal updates (PCGrad and GradOPS at T = 2) draw the same outline: the
    # dashes keep each visible.
    styles = ("-", "--", ":", "-.")
    for k, (label, (bin_edges, bin_counts)) in enumerate(histograms.items()):
        edges, counts = np.asarray(bin_edges, dtype=float), np.asarray(bin_counts, dtype=float)
        total = counts.sum()
        if total == 0:  # still named, so a method without measurements is not just missing
            axis.plot([], [], linestyle="none", label=f"{label}: no pairs measured")
            continue
        density = counts / (total * np.diff(edges))
        negative = counts[edges[1:] <= 0].sum() / total
        axis.stairs(density, edges, linewidth=1.6, linestyle=styles[k % len(styles)],
                    label=f"{label}: {100 * negative:.1f}% of {int(total):,} below 0")
    axis.axvline(0.0, color="gray", linewidth=0.8, linestyle="--",
                 label="cos = 0 (conflict to the left)")
    axis.set_xlim(-1, 1)
    axis.set_xlabel("cosine of two task gradients, cos(g_i, g_j)")
    axis.set_ylabel("density (per unit of cosine)")
    axis.set_title(title, fontsize=11)
    axis.legend(fontsize=8, title="method: (step, pair) cosines", title_fontsize=8,
                loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the data
    return figure


def plot_cosine_histograms(histograms: Mapping[str, Histogram], path: str | Path,
                           title: str = "Pairwise cosines of the task gradients") -> Path:
    """Save ``cosine_histograms_figure`` as ``path``."""
    return _save(cosine_histograms_figure(histograms, title), path)


def layer_heatmap_figure(layer_cosines: Mapping[str, np.ndarray], windows: int = 40,
                         title: str = "Conflict per shared layer") -> Figure:
    """Rows: shared layers; columns: training (measured steps in ``windows`` equal windows);
    colour: the fraction of (step, pair) entries in the window whose cosine is negative.

    >>> import numpy as np
    >>> cosines = {"conv": np.array([[-0.5], [0.2], [-0.1], [0.4]])}   # 4 steps, 1 pair
    >>> figure = layer_heatmap_figure(cosines, windows=2)
    >>> figure.axes[0].get_images()[0].get_array().tolist()
    [[0.5, 0.5]]
    >>> plt.close(figure)
    """
    layers = [layer for layer, cosines in layer_cosines.items() if cosines.size]
    steps = max((layer_cosines[layer].shape[0] for layer in layers), default=0)
    windows = max(1, min(windows, steps))
    grid = np.full((len(layers), windows), np.nan)
    for row, layer in enumerate(layers):
        cosines = layer_cosines[layer]
        for column, chunk in enumerate(np.array_split(np.arange(len(cosines)), windows)):
            if chunk.size:
                grid[row, column] = (cosines[chunk] < 0).mean()
    figure, axis = plt.subplots(figsize=(7.4, 1.5 + 0.32 * max(len(layers), 1)),
                                layout="constrained")
    # Each layer's own measured steps are split into the windows; when layers were measured on
    # different numbers of steps (one without a gradient on some), the axis is a fraction.
    same = len({layer_cosines[layer].shape[0] for layer in layers}) <= 1
    image = axis.imshow(grid, aspect="auto", cmap="magma_r", vmin=0.0, vmax=1.0,
                        interpolation="nearest",
                        extent=(0, max(steps, 1) if same else 1, len(layers) - 0.5, -0.5))
    axis.set_yticks(range(len(layers)), [layer or "(root)" for layer in layers], fontsize=8)
    if not steps:
        axis.set_xlabel("measured training step")
    elif same:
        axis.set_xlabel("measured training step" if windows == steps else
                        f"measured training step ({windows} windows of {steps / windows:.3g} "
                        "steps)")
    else:
        axis.set_xlabel(f"fraction of each layer's measured steps ({windows} windows)")
    axis.set_ylabel("shared layer")
    axis.set_title(title if layers else f"{title}: no layer measured", fontsize=11)
    # A layer without a gradient in a window (e.g. a branch) is blank: say so where colour is read.
    blank = "\n(white: no gradient)" if np.isnan(grid).any() else ""
    figure.colorbar(image, ax=axis, label=f"fraction of cosines < 0{blank}")
    return figure


def plot_layer_heatmap(layer_cosines: Mapping[str, np.ndarray], path: str | Path,
                       windows: int = 40, title: str = "Conflict per shared layer") -> Path:
    """Save ``layer_heatmap_figure`` as ``path``."""
    return _save(layer_heatmap_figure(layer_cosines, windows, title), path)
