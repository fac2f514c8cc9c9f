"""Plots of conflict diagnostics (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ..io import save_figure

Histogram = tuple[Sequence[float], Sequence[float]]  # bin edges, counts


def plot_cosine_histograms(histograms: Mapping[str, Histogram], path: str | Path,
                           title: str = "Pairwise cosines of the task gradients") -> Path:
    """The distribution of pairwise cosines, one outline per method (Recon slides, Figure 1).

    Each histogram is normalized to a density, so runs of different lengths compare; the legend
    gives each run's fraction of conflicting pairs (cosine < 0).
    """
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    for label, (edges, counts) in histograms.items():
        edges, counts = np.asarray(edges, dtype=float), np.asarray(counts, dtype=float)
        total = counts.sum()
        if total == 0:
            continue
        density = counts / (total * np.diff(edges))
        negative = counts[edges[1:] <= 0].sum() / total
        axis.stairs(density, edges, label=f"{label} ({100 * negative:.1f}% < 0)",
                    linewidth=1.6)
    axis.axvline(0.0, color="gray", linewidth=0.8, linestyle="--")
    axis.set_xlim(-1, 1)
    axis.set_xlabel("cos(g_i, g_j)")
    axis.set_ylabel("density")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    saved = save_figure(figure, path, dpi=130)
    plt.close(figure)
    return saved


def plot_layer_heatmap(layer_cosines: Mapping[str, np.ndarray], path: str | Path,
                       windows: int = 40, title: str = "Conflict per shared layer") -> Path:
    """Rows: shared layers; columns: training (measured steps in ``windows`` equal windows);
    colour: the fraction of (step, pair) entries in the window whose cosine is negative."""
    layers = [layer for layer, cosines in layer_cosines.items() if cosines.size]
    steps = max((layer_cosines[layer].shape[0] for layer in layers), default=0)
    windows = max(1, min(windows, steps))
    grid = np.full((len(layers), windows), np.nan)
    for row, layer in enumerate(layers):
        cosines = layer_cosines[layer]
        for column, chunk in enumerate(np.array_split(np.arange(len(cosines)), windows)):
            if chunk.size:
                grid[row, column] = (cosines[chunk] < 0).mean()
    figure, axis = plt.subplots(figsize=(7.0, 0.9 + 0.32 * max(len(layers), 1)))
    image = axis.imshow(grid, aspect="auto", cmap="magma_r", vmin=0.0, vmax=1.0,
                        interpolation="nearest", extent=(0, steps, len(layers) - 0.5, -0.5))
    axis.set_yticks(range(len(layers)), [layer or "(root)" for layer in layers], fontsize=8)
    axis.set_xlabel("measured training step")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="fraction conflicting")
    figure.tight_layout()
    saved = save_figure(figure, path, dpi=130)
    plt.close(figure)
    return saved
