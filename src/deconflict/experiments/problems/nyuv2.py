"""NYUv2 scene understanding: 13-class segmentation, depth and surface normals (GradOPS Section
4.2 and Table 2; CAGrad Section 5.2 and Table 1; the setup of Liu, Johns & Davison, CVPR 2019).

Data: the preprocessed MTAN arrays (``data.nyuv2``): 795 training and 654 ``val`` images of
288 x 384 pixels. The papers report on the 654 ``val`` images, so they are the test split; with
``validation_fraction`` = 0 (default) they are the validation split as well - then do not select
hyperparameters on validation if the test numbers are to stay unbiased - and with a fraction f
> 0 the last f of the (index-ordered) training images are held out as validation instead.
``samples`` keeps the first that many images of each folder.

Losses (as in the MTAN / CAGrad code), over a batch:

- segmentation: cross-entropy averaged over the pixels whose label is not -1;
- depth: L1, (1 / |V|) sum_{p in V} |d̂_p - d_p| over V = pixels with d_p != 0;
- normal: 1 - (1 / |V|) sum_{p in V} cos(n̂_p, n_p) over V = pixels with n_p != 0 (the
  prediction is unit length, so with unit ground truth this is the reference's 1 - n̂ · n).

A batch without any valid pixel for a task gives that task a zero loss (still attached to the
graph) instead of 0 / 0. Metrics: the nine of ``dense_metrics`` (mIoU and pixel accuracy,
absolute and relative depth error, mean and median normal angle error and the percentages within
11.25, 22.5 and 30 degrees).

Models: ``model="segnet"`` (GradOPS: a shared SegNet with a small head per task) or ``"mtan"``
(CAGrad: SegNet with per-task attention), widths ``filters``. MTAN has no single shared
representation, so ``representation=True`` (or a method that needs it, such as MGDA-UB) is
refused for it with InvalidOptionError.

The default configuration is the papers' (SegNet, Adam lr 1e-4, batch 2, 200 epochs) and is
GPU-scale: about 80,000 steps of a 25M-parameter network on 288 x 384 images, days on 2 CPU
cores, so unlike the other problems it does not finish within 10 minutes on CPU. The learning
rate follows the papers' schedule (the MTAN and CAGrad code's ``StepLR(step_size=100,
gamma=0.5)``): epoch e (from 0) trains at lr * lr_decay^floor(e / lr_step), so with the defaults
epochs 0-99 at 1e-4 and 100-199 at 5e-5 (``lr_step=none``: constant). The smoke configuration
(tiny widths, 4 images, 1 epoch) runs in seconds.

Recon (``branch``): any layer of SegNet's trunk, or of MTAN's shared trunk and attention blocks
(names as in ``MTAN.shared``: ``trunk.encoder_first.2``, ``encoder_blocks.1``, ...); MTAN is
branched by ``MTAN.branch``, which traces its whole body (``segnet`` module docstring).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional

from ...errors import InvalidOptionError
from ...methods.base import Method
from ..data.nyuv2 import CLASSES, IGNORE_INDEX, NYUv2Split, load_nyuv2
from ..dense_metrics import TASK_METRICS, DenseMetrics
from ..segnet import DEFAULT_FILTERS, MTAN, SegNet
from .base import (
    DATA,
    REPRESENTATION,
    WEIGHT_DECAY,
    Data,
    Dataset,
    Metric,
    MultiTaskModel,
    SupervisedProblem,
    TrainingRun,
    batch_size_setting,
    epochs_setting,
    lr_setting,
)
from .settings import Setting

TASKS = ("segmentation", "depth", "normal")
_HIGHER_IS_BETTER = {"miou": True, "pixel_accuracy": True, "depth_abs_error": False,
                     "depth_rel_error": False, "normal_mean": False, "normal_median": False,
                     "normal_within_11.25": True, "normal_within_22.5": True,
                     "normal_within_30": True}
MODELS = ("segnet", "mtan")


def _dataset(split: NYUv2Split, rows: slice = slice(None)) -> Dataset:
    return Dataset(split.images[rows], {"segmentation": split.labels[rows],
                                        "depth": split.depth[rows],
                                        "normal": split.normals[rows]})


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    count = valid.sum()
    if count == 0:
        return values.sum() * 0.0
    return (values * valid).sum() / count


def _normal_valid(target: Tensor) -> Tensor:
    return (target != 0).any(dim=1)


class NYUv2(SupervisedProblem):
    name = "nyuv2"
    description = ("NYUv2: 13-class segmentation, depth, surface normals; SegNet (GradOPS "
                   "Table 2) or MTAN (CAGrad Table 1); GPU-scale")
    schema = (
        epochs_setting(200, 1),
        batch_size_setting(2),
        lr_setting(1e-4, 1e-3),
        WEIGHT_DECAY,
        Setting("lr_step", "int", 100, "epochs between multiplications of the learning rate "
                "by lr_decay (none: constant)", low=1, optional=True),
        Setting("lr_decay", "float", 0.5, "factor of the learning rate every lr_step epochs",
                low=0.0, high=1.0, open_low=True),
        Setting("model", "str", "segnet", "shared SegNet with a head per task (GradOPS) or "
                "MTAN's per-task attention (CAGrad)", choices=MODELS),
        Setting("filters", "ints", list(DEFAULT_FILTERS), "channels of the encoder stages",
                [4, 8], low=1),
        Setting("samples", "int", None, "keep the first that many images of each folder", 4,
                low=1, optional=True),
        Setting("validation_fraction", "float", 0.0, "last fraction of the training images "
                "held out as validation (0: the val images serve as both)", low=0.0, high=1.0,
                open_high=True),
        Setting("eval_batch_size", "int", 2, "images per evaluation batch (none: batch_size)",
                4, low=1, optional=True),
        REPRESENTATION,
        DATA,
    )

    def __init__(self) -> None:
        # Each model's optimizer, for the epoch's learning rate (the loop hands ``batches`` the
        # run, not the optimizer); weak, so that finished runs are not kept alive.
        self._optimizers: weakref.WeakKeyDictionary[nn.Module, torch.optim.Optimizer] = (
            weakref.WeakKeyDictionary())

    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        return TASKS

    @staticmethod
    def learning_rate(config: Mapping[str, Any], epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (0-based): lr * lr_decay^floor(epoch / lr_step),
        what ``torch.optim.lr_scheduler.StepLR`` gives after ``epoch`` steps.

        >>> NYUv2.learning_rate({"lr": 1e-4, "lr_step": 100, "lr_decay": 0.5}, 100)
        5e-05
        """
        step = config.get("lr_step")
        if not step:
            return float(config["lr"])
        return float(config["lr"]) * float(config.get("lr_decay", 0.5)) ** (epoch // step)

    def make_optimizer(self, model: nn.Module, config: Mapping[str, Any]
                       ) -> torch.optim.Optimizer:
        optimizer = super().make_optimizer(model, config)
        self._optimizers[model] = optimizer
        return optimizer

    def batches(self, run: TrainingRun, generator: torch.Generator
                ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        # Called as each epoch starts (a resumed run too): set that epoch's rate first.
        optimizer = self._optimizers.get(run.model)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate(run.config, run.epoch)
        return super().batches(run, generator)

    def model_for(self, config: Mapping[str, Any], tasks: Sequence[str], data: Data,
                  seed: int) -> MultiTaskModel:
        layers = list(config.get("branch") or [])
        if config.get("model") != "mtan" or not layers:
            return super().model_for(config, tasks, data, seed)
        # MTAN's shared layers are not one trunk module: the model branches its whole body.
        model = super().model_for({**config, "branch": []}, tasks, data, seed)
        if not isinstance(model, MTAN):  # pragma: no cover - build_model makes one for "mtan"
            raise InvalidOptionError("nyuv2: model='mtan' did not build an MTAN")
        model.branch(layers, len(tasks))
        return model

    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        return tuple(Metric(name, task, _HIGHER_IS_BETTER[name])
                     for task in TASKS for name in TASK_METRICS[task])

    def load(self, config: Mapping[str, Any]) -> Data:
        limit = config.get("samples")
        train = load_nyuv2(config.get("data"), "train", limit)
        test = load_nyuv2(config.get("data"), "val", limit)
        fraction = float(config.get("validation_fraction") or 0.0)
        if not 0.0 <= fraction < 1.0:
            raise InvalidOptionError(f"nyuv2: validation_fraction must be in [0, 1), got "
                                     f"{fraction}")
        held_out = round(fraction * len(train))
        if fraction > 0 and not 0 < held_out < len(train):
            raise InvalidOptionError(f"nyuv2: validation_fraction {fraction} of {len(train)} "
                                     "training images leaves an empty split")
        size = f"{train.images.shape[-2]} x {train.images.shape[-1]}"
        if held_out:
            cut = len(train) - held_out
            note = (f"NYUv2 from {train.directory.parent}: {cut} training images, the last "
                    f"{held_out} training images as validation, the {len(test)} val images as "
                    f"test ({size} pixels)")
            return Data(_dataset(train, slice(None, cut)), _dataset(train, slice(cut, None)),
                        _dataset(test), note)
        note = (f"NYUv2 from {train.directory.parent}: {len(train)} training images; the "
                f"{len(test)} val images serve as both validation and test, as in the papers "
                f"({size} pixels)")
        return Data(_dataset(train), _dataset(test), _dataset(test), note)

    def build_model(self, config: Mapping[str, Any], tasks: Sequence[str],
                    data: Data) -> MultiTaskModel:
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise InvalidOptionError(f"nyuv2 has no task {unknown[0]!r}; its tasks are "
                                     f"{', '.join(TASKS)}")
        if config["model"] == "segnet":
            return SegNet(tasks, config["filters"], CLASSES)
        if config["model"] == "mtan":
            if config.get("representation"):
                raise InvalidOptionError(_MTAN_REPRESENTATION)
            return MTAN(tasks, config["filters"], CLASSES)
        raise InvalidOptionError(f"nyuv2: model must be one of {', '.join(MODELS)}, got "
                                 f"{config['model']!r}")

    def adjust_method(self, method: Method, config: Mapping[str, Any]) -> Method:
        # A method that needs the representation cannot work with MTAN, and the engine's own
        # error would not say why.
        if config.get("model") == "mtan" and method.needs_features:
            raise InvalidOptionError(f"{method.name} works on the shared representation; "
                                     f"{_MTAN_REPRESENTATION}")
        return method

    def losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               tasks: Sequence[str]) -> list[Tensor]:
        losses = []
        for task in tasks:
            prediction, target = outputs[task], targets[task]
            if task == "segmentation":
                labelled = target != IGNORE_INDEX
                if not bool(labelled.any()):
                    losses.append(prediction.sum() * 0.0)
                else:
                    losses.append(functional.cross_entropy(prediction, target.long(),
                                                           ignore_index=IGNORE_INDEX))
            elif task == "depth":
                losses.append(_masked_mean((prediction - target).abs(), target != 0))
            else:
                cosine = functional.cosine_similarity(prediction, target, dim=1, eps=1e-12)
                losses.append(1.0 - _masked_mean(cosine, _normal_valid(target)))
        return losses

    def evaluate(self, model: MultiTaskModel, dataset: Dataset, tasks: Sequence[str],
                 config: Mapping[str, Any]) -> dict[str, float]:
        device = next(model.parameters()).device
        accumulator = DenseMetrics(tasks, CLASSES)
        for inputs, targets in dataset.batches(config.get("eval_batch_size") or
                                               config["batch_size"]):
            accumulator.update(model(inputs.to(device))[1], targets)
        return accumulator.compute()


_MTAN_REPRESENTATION = (
    "nyuv2: MTAN has no single shared representation (each task's attention reads the shared "
    "network at every stage and goes through shared attention blocks), so representation mode "
    "is not supported with model='mtan'; use model='segnet' or representation=False"
)
