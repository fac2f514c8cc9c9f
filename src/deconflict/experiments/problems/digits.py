"""Two-digit classification and reconstruction (the tensioner paper, Section 4.3).

Task "left": classify the upper-left digit (negative log-likelihood; metric accuracy). Task
"right": reconstruct the lower-right digit through the shared latent (MSE; metric reconstruction
MSE, lower is better), or, with ``variant="classify_both"``, classify it too. Model: a LeNet-like
shared encoder to a 50-dimensional latent, a classifier or an MLP decoder per task.

``digits``: the real handwritten digits bundled with scikit-learn (1,797 images of 8 x 8, on a
10 x 10 canvas), no files needed. ``multi-mnist``: MNIST from the standard idx files (28 x 28 on a
32 x 32 canvas resized to 28 x 28, as in the paper). The digit images are split first
(deterministically) and pairs are drawn within each split, so no test digit is seen in training.

``model`` (default ``conv``, the paper's model above) also takes the multi-task architectures of
``experiments.models``, as on census-income: ``shared_bottom`` (an MLP trunk, ``hidden``),
``mmoe`` and ``dselect_k`` (``experts`` MLP experts of shape ``expert_hidden``; ``k``,
``gamma``), ``cgc`` and ``ple`` (``experts`` shared and ``task_experts`` per-task experts per
level, ``levels``) and ``cross_stitch`` (one ``hidden``-shaped tower per task). They read the
flattened canvas (100 pixels for ``digits``, 784 for ``multi-mnist``): MLP experts suffice for
8 x 8 digits (the conv encoder's locality matters little at that size), and each task keeps
the conv model's head (``models.digit_head``: a linear classifier to log-probabilities, or the
MLP decoder to the 64 sigmoid pixels of the lower-right digit) in place of its tower. The
architecture settings are ``neutral``: at their defaults (sized for 2 CPU cores, not from the
papers) earlier records keep their keys. Representation mode applies to conv, shared_bottom,
mmoe and dselect_k only (CGC, PLE and cross-stitch have no representation every task reads).

The paper's Table 3 protocol is available through the neutral ``TRAINING`` settings of
``problems.base``: ``optimizer=sgd`` with ``momentum``, and ``patience`` (early stopping on the
validation losses, the best epoch's weights restored for the test metrics); the learning-rate
sweep is ``deconflict compare --grid lr=...`` (``experiments.tuning``). The defaults (Adam, a
fixed number of epochs) are the earlier runs'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import InvalidOptionError
from ...methods.base import Method
from ..data.two_digits import TwoDigits, compose
from ..models import (
    CGC,
    PLE,
    CrossStitch,
    DSelectK,
    MMoE,
    SharedBottom,
    TwoDigitModel,
    digit_head,
    replace_task_heads,
)
from .base import (
    DATA,
    REPRESENTATION,
    TRAINING,
    WEIGHT_DECAY,
    Data,
    Dataset,
    Metric,
    MultiTaskModel,
    SupervisedProblem,
    batch_size_setting,
    epochs_setting,
    lr_setting,
    predict,
)
from .census import MODELS as ARCHITECTURES
from .census import WITHOUT_REPRESENTATION
from .settings import Setting

MODELS = ("conv", *ARCHITECTURES)
VARIANTS = ("classify_reconstruct", "classify_both")
SPLIT_SEED = 0


def _dataset(samples: TwoDigits, variant: str) -> Dataset:
    right = samples.right_images if variant == "classify_reconstruct" else samples.right_labels
    return Dataset(torch.from_numpy(samples.images),
                   {"left": torch.from_numpy(samples.left_labels),
                    "right": torch.from_numpy(right)})


def _schema(epochs: int, batch_size: int, pairs: float, smoke_pairs: float
            ) -> tuple[Setting, ...]:
    return (
        epochs_setting(epochs, 1),
        batch_size_setting(batch_size),
        lr_setting(1e-3),
        WEIGHT_DECAY,
        Setting("latent", "int", 50, "width of the shared latent", 8, low=1),
        Setting("pairs_per_image", "float", pairs, "two-digit images composed per digit image",
                smoke_pairs, low=0.0, open_low=True),
        Setting("variant", "str", VARIANTS[0], "reconstruct the lower-right digit or classify "
                "it too", choices=VARIANTS),
        # Added with the architectures: neutral and without smoke values (a smoke value would
        # differ from the default and change the smoke records' keys); the defaults are small.
        Setting("model", "str", "conv", "the paper's conv encoder, or a multi-task architecture "
                "on the flattened canvas (see experiments.models)", choices=MODELS,
                neutral=True),
        Setting("hidden", "ints", [64, 32], "units of shared_bottom's trunk and of each "
                "cross_stitch tower", low=1, neutral=True),
        Setting("experts", "int", 4, "experts of mmoe and dselect_k; shared experts per level "
                "of cgc and ple", low=1, neutral=True),
        Setting("expert_hidden", "ints", [32, 16], "units of each expert's layers", low=1,
                neutral=True),
        Setting("task_experts", "int", 1, "task-specific experts per task and level (cgc, ple)",
                low=1, neutral=True),
        Setting("levels", "int", 2, "extraction levels of ple", low=1, neutral=True),
        Setting("k", "int", 2, "experts each dselect_k gate selects at most", low=1,
                neutral=True),
        Setting("gamma", "float", 1.0, "width of dselect_k's smooth-step band", low=0.0,
                open_low=True, neutral=True),
        Setting("dropout", "float", 0.0, "dropout probability of the architectures' MLPs",
                low=0.0, high=1.0, open_high=True, neutral=True),
        REPRESENTATION,
        DATA,
        *TRAINING,
    )


def _architecture(config: Mapping[str, Any], inputs: int, kinds: Mapping[str, tuple[str, int]]
                  ) -> MultiTaskModel:
    """``config["model"]`` on ``inputs`` flattened pixels, each task's tower or head replaced by
    its ``digit_head``."""
    model, dropout = config["model"], config["dropout"]
    # Raw outputs of the right count first; the digit heads then take their place.
    outputs = {t: n for t, (_, n) in kinds.items()}
    net: MultiTaskModel
    if model == "shared_bottom":
        net, width = SharedBottom(inputs, config["hidden"], outputs, dropout), config["hidden"][-1]
    elif model == "cross_stitch":
        net, width = CrossStitch(inputs, config["hidden"], outputs, dropout), config["hidden"][-1]
    else:
        width = config["expert_hidden"][-1]
        if model == "mmoe":
            net = MMoE(inputs, config["experts"], config["expert_hidden"], outputs, dropout)
        elif model == "dselect_k":
            net = DSelectK(inputs, config["experts"], config["expert_hidden"], outputs, dropout,
                           k=config["k"], gamma=config["gamma"])
        elif model == "cgc":
            net = CGC(inputs, outputs, config["experts"], config["task_experts"],
                      config["expert_hidden"], dropout)
        elif model == "ple":
            net = PLE(inputs, outputs, config["experts"], config["task_experts"],
                      config["expert_hidden"], config["levels"], dropout)
        else:
            raise InvalidOptionError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    return replace_task_heads(net, {t: digit_head(kind, width, n)
                                    for t, (kind, n) in kinds.items()})


def _no_representation(name: str, model: str) -> str:
    return (f"{name}: {model} has no shared representation that every task reads (each task "
            "reads its own output of the trunk), so representation mode is not supported with "
            "it; use conv, shared_bottom, mmoe or dselect_k, or representation=False")


class TwoDigitProblem(SupervisedProblem):
    """Shared by ``digits`` and ``multi-mnist``; subclasses give the digit images."""

    canvas: int
    resize: int | None = None

    def _images(self, config: Mapping[str, Any]) -> tuple[dict[str, tuple[np.ndarray,
                                                                       np.ndarray]], str]:
        raise NotImplementedError

    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        return ("left", "right")

    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        right = (Metric("mse_right", "right", False) if config["variant"] == VARIANTS[0]
                 else Metric("accuracy_right", "right", True))
        return (Metric("accuracy_left", "left", True), right)

    def load(self, config: Mapping[str, Any]) -> Data:
        if config["variant"] not in VARIANTS:
            raise InvalidOptionError(f"{self.name}: variant must be one of {list(VARIANTS)}")
        flat = config.get("model", "conv") != "conv"
        splits, note = self._images(config)
        datasets = []
        for k, name in enumerate(("train", "validation", "test")):
            images, labels = splits[name]
            count = int(len(images) * config["pairs_per_image"])
            samples = compose(images, labels, count, self.canvas, SPLIT_SEED + k, self.resize)
            dataset = _dataset(samples, config["variant"])
            if flat:  # the architectures' MLPs read the canvas as one vector
                dataset = Dataset(dataset.inputs.flatten(1), dataset.targets)
            datasets.append(dataset)
        train, validation, test = datasets
        return Data(train, validation, test, note=note)

    def build_model(self, config: Mapping[str, Any], tasks: Sequence[str],
                    data: Data) -> MultiTaskModel:
        size = data.train.inputs.shape[-1]
        kinds = {"left": ("classify", 10)}
        if config["variant"] == VARIANTS[0]:
            kinds["right"] = ("reconstruct", data.train.targets["right"].shape[1])
        else:
            kinds["right"] = ("classify", 10)
        chosen = {t: kinds[t] for t in tasks}
        model = config.get("model", "conv")
        if model == "conv":
            return TwoDigitModel(size, config["latent"], chosen)
        if model in WITHOUT_REPRESENTATION and config.get("representation"):
            raise InvalidOptionError(_no_representation(self.name, model))
        return _architecture(config, size, chosen)

    def adjust_method(self, method: Method, config: Mapping[str, Any]) -> Method:
        # The engine's own error would not say why a representation method cannot work here.
        if config.get("model") in WITHOUT_REPRESENTATION and method.needs_features:
            raise InvalidOptionError(f"{method.name} works on the shared representation; "
                                     f"{_no_representation(self.name, config['model'])}")
        return method

    def losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               tasks: Sequence[str]) -> list[Tensor]:
        losses = []
        for task in tasks:
            if targets[task].dtype == torch.int64:
                losses.append(torch.nn.functional.nll_loss(outputs[task], targets[task]))
            else:
                losses.append(torch.nn.functional.mse_loss(outputs[task], targets[task]))
        return losses

    def evaluate(self, model: MultiTaskModel, dataset: Dataset, tasks: Sequence[str],
                 config: Mapping[str, Any]) -> dict[str, float]:
        outputs = predict(model, dataset)
        metrics = {}
        for task in tasks:
            target = dataset.targets[task]
            if target.dtype == torch.int64:
                metrics[f"accuracy_{task}"] = float((outputs[task].argmax(-1) == target)
                                                    .double().mean())
            else:
                metrics[f"mse_{task}"] = float(((outputs[task] - target) ** 2).mean())
        return metrics


class Digits(TwoDigitProblem):
    name = "digits"
    description = ("scikit-learn's handwritten digits in pairs: classify the upper-left one, "
                   "reconstruct (or classify) the lower-right one (tensioner paper Section 4.3)")
    canvas = 10
    schema = _schema(epochs=30, batch_size=64, pairs=2.0, smoke_pairs=0.25)

    def _images(self, config: Mapping[str, Any]) -> tuple[dict[str, tuple[np.ndarray,
                                                                       np.ndarray]], str]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
        a, b = int(0.6 * len(order)), int(0.8 * len(order))
        parts = {"train": order[:a], "validation": order[a:b], "test": order[b:]}
        note = (f"scikit-learn digits ({len(images):,} images of 8 x 8), split deterministically "
                f"60/20/20 before pairing, {config['pairs_per_image']:g} pairs per image")
        return {k: (images[v], digits.target[v]) for k, v in parts.items()}, note


class MultiMnist(TwoDigitProblem):
    name = "multi-mnist"
    description = ("MNIST digits in pairs (standard idx files): classify the upper-left one, "
                   "reconstruct (or classify) the lower-right one (tensioner paper Section 4.3)")
    canvas = 32
    resize = 28
    schema = _schema(epochs=10, batch_size=128, pairs=1.0, smoke_pairs=0.05)

    def _images(self, config: Mapping[str, Any]) -> tuple[dict[str, tuple[np.ndarray,
                                                                       np.ndarray]], str]:
        from ..data.mnist import load_mnist

        mnist = load_mnist(config.get("data"))
        return {"train": mnist.train, "validation": mnist.validation, "test": mnist.test}, \
            mnist.note
