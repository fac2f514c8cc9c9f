"""Recon's S-conflict scores (Shi et al., ICLR 2023; docs/methods.md#recon).

While a base method trains the shared model, every step gives, for every shared layer k (a
module: weight and bias together) and every task pair i < j, the cosine of the two task
gradients restricted to that layer, cos_ij^(k) (from the layer Gramians: ``ConflictMonitor``).
The S-conflict score of layer k counts the (step, pair) entries below S (slides Definition 3):

    s_k = sum over steps and pairs i < j of 1[cos_ij^(k) < S],   -1 < S <= 0.

The layers with the K highest scores become task-specific (``recon.branch``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import InvalidOptionError


def conflict_scores(layer_cosines: Mapping[str, np.ndarray], threshold: float) -> dict[str, int]:
    """s_k for each layer, from its cosines (steps x pairs, as ``ConflictMonitor.layer_cosines``).

    ``threshold`` is S; the slides define it in (-1, 0], the authors use -0.1, -0.02 and 0.

    Two layers, two steps of one task pair each (rows: steps, columns: pairs):

    >>> import numpy as np
    >>> cosines = {"conv1": np.array([[-0.5], [-0.3]]), "conv2": np.array([[0.1], [-0.2]])}
    >>> conflict_scores(cosines, threshold=-0.1)
    {'conv1': 2, 'conv2': 1}
    """
    if not -1.0 < threshold <= 0.0:
        raise InvalidOptionError(f"the conflict threshold S must be in (-1, 0], got {threshold}")
    return {layer: int((np.asarray(cosines) < threshold).sum())
            for layer, cosines in layer_cosines.items()}


def top_layers(scores: Mapping[str, int], k: int) -> list[str]:
    """The ``k`` layers with the highest scores, highest first; ties keep the layers' order.

    Layers that never conflicted (score 0) are not chosen: branching them removes no conflict.

    >>> top_layers({"conv1": 2, "conv2": 1, "fc": 0}, k=2)
    ['conv1', 'conv2']
    >>> top_layers({"conv1": 2, "conv2": 1, "fc": 0}, k=3)   # fc never conflicted
    ['conv1', 'conv2']
    """
    if k < 1:
        raise InvalidOptionError(f"topk must be a positive integer, got {k}")
    ranked = sorted(scores, key=lambda layer: -scores[layer])  # stable: ties keep the order
    return [layer for layer in ranked[:k] if scores[layer] > 0]
