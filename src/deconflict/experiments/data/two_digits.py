"""Two digits on one canvas (the tensioner paper's Section 4.3 construction).

Each sample overlays two digit images: the first in the upper-left corner of a square canvas,
the second in the lower-right corner (overlapping pixels take the maximum); for MNIST the 32 x 32
canvas is resized to 28 x 28. The pairs are drawn with a fixed generator, so every run sees the
same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TwoDigits:
    images: np.ndarray  # (N, 1, S, S) float32
    left_labels: np.ndarray  # (N,) int64
    right_labels: np.ndarray  # (N,) int64
    right_images: np.ndarray  # (N, h * w) float32, the lower-right digit alone


def compose(images: np.ndarray, labels: np.ndarray, count: int, canvas: int, seed: int,
            resize: int | None = None) -> TwoDigits:
    """``count`` two-digit samples from digit images (N x h x w, values in [0, 1])."""
    rng = np.random.default_rng(seed)
    left = rng.integers(len(images), size=count)
    right = rng.integers(len(images), size=count)
    h, w = images.shape[1:]
    board = np.zeros((count, canvas, canvas), dtype=np.float32)
    board[:, :h, :w] = images[left]
    board[:, canvas - h:, canvas - w:] = np.maximum(board[:, canvas - h:, canvas - w:],
                                                    images[right])
    stacked = torch.from_numpy(board).unsqueeze(1)
    if resize is not None:
        stacked = torch.nn.functional.interpolate(stacked, size=(resize, resize),
                                                  mode="bilinear", align_corners=False)
    return TwoDigits(stacked.numpy(), labels[left].astype(np.int64),
                     labels[right].astype(np.int64),
                     images[right].reshape(count, -1).astype(np.float32))
