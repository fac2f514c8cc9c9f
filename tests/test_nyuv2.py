"""NYUv2: dense metrics on hand-computed cases, the .npy loader on generated trees, the SegNet
and MTAN models, and the problem's smoke run - all on small synthetic tensors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import deconflict
from deconflict.errors import DataFormatError, DataNotFoundError, InvalidOptionError, ShapeError
from deconflict.experiments.data.nyuv2 import load_nyuv2
from deconflict.experiments.dense_metrics import (
    DenseMetrics,
    NormalAccumulator,
    SegmentationAccumulator,
    depth_metrics,
    normal_metrics,
    segmentation_metrics,
)
from deconflict.experiments.problems.nyuv2 import NYUv2
from deconflict.experiments.segnet import MTAN, SegNet

METRICS = ("miou", "pixel_accuracy", "depth_abs_error", "depth_rel_error", "normal_mean",
           "normal_median", "normal_within_11.25", "normal_within_22.5", "normal_within_30")
TASKS = ("segmentation", "depth", "normal")


# ------------------------------------------------------------------------------------ metrics
def test_segmentation_metrics_by_hand():
    # valid pixels (target, prediction): (0, 0), (0, 1), (1, 1); the ignored pixel predicts 2.
    # Confusion H[0,0] = H[0,1] = H[1,1] = 1. IoU_0 = 1 / (2 + 1 - 1) = 1/2,
    # IoU_1 = 1 / (1 + 2 - 1) = 1/2; class 2 only appears under the ignored pixel, so it has
    # no union and is left out: mIoU = 50%. Pixel accuracy = 2 / 3.
    target = torch.tensor([[[0, 0], [1, -1]]])
    prediction = torch.tensor([[[0, 1], [1, 2]]])
    accumulator = SegmentationAccumulator()
    accumulator.update(prediction, target)
    expected = torch.zeros(13, 13, dtype=torch.int64)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = 1
    assert torch.equal(accumulator.confusion, expected)
    result = accumulator.compute()
    assert result["miou"] == pytest.approx(50.0)
    assert result["pixel_accuracy"] == pytest.approx(200 / 3)
    # The same from logits (argmax over the class channel).
    logits = torch.nn.functional.one_hot(prediction, 13).permute(0, 3, 1, 2).float()
    assert segmentation_metrics(logits, target) == pytest.approx(result)


def test_segmentation_pools_pixels_over_batches():
    # Batch 1: four pixels of class 0, one predicted 1 -> H[0,0] = 3, H[0,1] = 1.
    # Batch 2: four pixels of class 1, all right -> H[1,1] = 4.
    # Pooled: IoU_0 = 3 / (4 + 3 - 3) = 3/4, IoU_1 = 4 / (4 + 5 - 4) = 4/5, mIoU = 77.5%,
    # pixel accuracy 7/8 = 87.5%. (Averaging per-batch mIoUs would give (37.5 + 100) / 2.)
    zeros, ones = torch.zeros(1, 2, 2, dtype=torch.int64), torch.ones(1, 2, 2, dtype=torch.int64)
    accumulator = SegmentationAccumulator()
    accumulator.update(torch.tensor([[[0, 0], [0, 1]]]), zeros)
    accumulator.update(ones, ones)
    result = accumulator.compute()
    assert result["miou"] == pytest.approx(77.5)
    assert result["pixel_accuracy"] == pytest.approx(87.5)


def test_segmentation_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"0\.\.12"):
        segmentation_metrics(torch.zeros(1, 2, 2, dtype=torch.int64),
                             torch.full((1, 2, 2), 13))


def test_depth_errors_by_hand():
    # Valid pixels (target != 0): |1 - 2| = 1 (rel 1/2), |2 - 2| = 0, |9 - 6| = 3 (rel 1/2).
    # abs = 4 / 3, rel = 1 / 3. The pixel with target 0 (error 4) is not counted.
    prediction = torch.tensor([[[[1.0, 2.0], [4.0, 9.0]]]])
    target = torch.tensor([[[[2.0, 2.0], [0.0, 6.0]]]])
    result = depth_metrics(prediction, target)
    assert result["depth_abs_error"] == pytest.approx(4 / 3)
    assert result["depth_rel_error"] == pytest.approx(1 / 3)


def _normals_at(angles_degrees, extra=None):
    """Predictions at the given angles from the true normal (0, 0, 1), one pixel each, in a
    1 x 3 x 1 x P batch; ``extra`` appends a pixel with this prediction and a zero target."""
    theta = torch.deg2rad(torch.tensor(angles_degrees, dtype=torch.float64))
    prediction = torch.stack([torch.sin(theta), torch.zeros_like(theta), torch.cos(theta)])
    target = torch.zeros_like(prediction)
    target[2] = 1.0
    if extra is not None:
        prediction = torch.cat([prediction, torch.tensor(extra).reshape(3, 1)], dim=1)
        target = torch.cat([target, torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    return prediction[None, :, None, :].float(), target[None, :, None, :].float()


def test_normal_errors_by_hand():
    # Angles 0, 20, 45, 90: mean 155 / 4 = 38.75, median (20 + 45) / 2 = 32.5; within 11.25: 1
    # of 4, within 22.5 and 30: 2 of 4. The last pixel (prediction opposite, 180 degrees) has a
    # zero ground truth and is left out.
    prediction, target = _normals_at([0.0, 20.0, 45.0, 90.0], extra=[0.0, 0.0, -1.0])
    result = normal_metrics(prediction, target)
    assert result["normal_mean"] == pytest.approx(38.75, abs=1e-4)
    assert result["normal_median"] == pytest.approx(32.5, abs=1e-3)
    assert result["normal_within_11.25"] == pytest.approx(25.0)
    assert result["normal_within_22.5"] == pytest.approx(50.0)
    assert result["normal_within_30"] == pytest.approx(50.0)


def test_normal_median_odd_count_and_batches():
    # 0, 45, 90 in two batches: the median is the middle one, 45; the mean is 45 too.
    accumulator = NormalAccumulator()
    accumulator.update(*_normals_at([0.0, 90.0]))
    accumulator.update(*_normals_at([45.0]))
    assert accumulator.median() == pytest.approx(45.0, abs=1e-3)
    assert accumulator.compute()["normal_mean"] == pytest.approx(45.0, abs=1e-4)
    # An exact match is exactly 0 degrees (atan2, not acos, near 0).
    assert normal_metrics(*_normals_at([0.0]))["normal_mean"] == 0.0


def test_normal_thresholds_near_their_edges():
    # Half a degree either side of each threshold: 1 of 6 below 11.25, 3 below 22.5, 5 below 30.
    result = normal_metrics(*_normals_at([11.0, 11.5, 22.0, 23.0, 29.5, 30.5]))
    assert result["normal_within_11.25"] == pytest.approx(100 / 6)
    assert result["normal_within_22.5"] == pytest.approx(50.0)
    assert result["normal_within_30"] == pytest.approx(500 / 6)


def test_dense_metrics_names_and_shape_errors():
    metrics = DenseMetrics(TASKS)
    prediction, target = _normals_at([10.0])
    outputs = {"segmentation": torch.zeros(1, 13, 1, 1), "depth": torch.ones(1, 1, 1, 1),
               "normal": prediction}
    targets = {"segmentation": torch.zeros(1, 1, 1, dtype=torch.int64),
               "depth": torch.full((1, 1, 1, 1), 2.0), "normal": target}
    metrics.update(outputs, targets)
    result = metrics.compute()
    assert tuple(result) == METRICS
    # segmentation right (100%), depth |1 - 2| = 1 (rel 1/2), normal 10 degrees.
    assert result["miou"] == 100.0 and result["depth_rel_error"] == pytest.approx(0.5)
    assert result["normal_mean"] == pytest.approx(10.0, abs=1e-4)
    with pytest.raises(ShapeError, match="depth prediction"):
        DenseMetrics(("depth",)).update({"depth": torch.ones(1, 2, 1, 1)},
                                        {"depth": torch.ones(1, 2, 1, 1)})


# ------------------------------------------------------------------------------------- loader
SIZE = (16, 16)


def write_nyuv2(root: Path, counts=(("train", 4), ("val", 2)), channels_last: bool = True,
                seed: int = 0) -> dict[str, dict[str, list[np.ndarray]]]:
    """A small tree in the MTAN layout; returns the arrays written, channels first."""
    rng = np.random.default_rng(seed)
    h, w = SIZE
    written: dict[str, dict[str, list[np.ndarray]]] = {}
    for split, n in counts:
        written[split] = {kind: [] for kind in ("image", "label", "depth", "normal")}
        for folder in written[split]:
            (root / split / folder).mkdir(parents=True)
        for i in range(n):
            image = rng.random((3, h, w), dtype=np.float32)
            label = rng.integers(-1, 13, (h, w)).astype(np.float32)  # floats, as published
            depth = rng.uniform(0.5, 5.0, (1, h, w)).astype(np.float32)
            depth[0, 0, :4] = 0.0  # no measurement
            normal = rng.normal(size=(3, h, w)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=0, keepdims=True)
            normal[:, 1, :4] = 0.0  # no measurement
            for kind, array in (("image", image), ("label", label), ("depth", depth),
                                ("normal", normal)):
                written[split][kind].append(array)
                stored = np.moveaxis(array, 0, -1) if channels_last and array.ndim == 3 else array
                np.save(root / split / kind / f"{i}.npy", stored)
    return written


def test_loader_reads_the_mtan_layout(tmp_path):
    written = write_nyuv2(tmp_path)
    train = load_nyuv2(tmp_path, "train")
    assert train.images.shape == (4, 3, 16, 16) and train.images.dtype == torch.float32
    assert train.labels.shape == (4, 16, 16) and train.labels.dtype == torch.int64
    assert train.depth.shape == (4, 1, 16, 16) and train.normals.shape == (4, 3, 16, 16)
    assert np.array_equal(train.images[2].numpy(), written["train"]["image"][2])
    assert np.array_equal(train.labels[3].numpy(), written["train"]["label"][3])
    assert np.array_equal(train.depth[1].numpy(), written["train"]["depth"][1])
    assert np.array_equal(train.normals[0].numpy(), written["train"]["normal"][0])
    assert len(load_nyuv2(tmp_path, "val")) == 2
    assert len(load_nyuv2(tmp_path, "train", limit=3)) == 3


def test_loader_accepts_channels_first_and_the_environment(tmp_path, monkeypatch):
    written = write_nyuv2(tmp_path / "nyuv2", channels_last=False)
    monkeypatch.setenv("DECONFLICT_DATA", str(tmp_path))  # found in its nyuv2 subfolder
    val = load_nyuv2(split="val")
    assert np.array_equal(val.normals[1].numpy(), written["val"]["normal"][1])
    with pytest.raises(DataNotFoundError):
        load_nyuv2(tmp_path / "elsewhere")


def _expect_format_error(root: Path, names: str) -> None:
    with pytest.raises(DataFormatError) as error:
        load_nyuv2(root, "train")
    assert names in str(error.value)


def test_loader_missing_folder(tmp_path):
    write_nyuv2(tmp_path)
    for file in (tmp_path / "train" / "normal").iterdir():
        file.unlink()
    (tmp_path / "train" / "normal").rmdir()
    _expect_format_error(tmp_path, str(tmp_path / "train" / "normal"))


def test_loader_count_mismatch(tmp_path):
    write_nyuv2(tmp_path)
    (tmp_path / "train" / "depth" / "3.npy").unlink()
    _expect_format_error(tmp_path, str(tmp_path / "train" / "depth" / "3.npy"))


@pytest.mark.parametrize(("kind", "array", "message"), [
    ("normal", np.zeros((16, 16, 2), np.float32), "normal array has shape (16, 16, 2)"),
    ("label", np.zeros((16, 16, 1), np.float32), "label array has shape"),
    ("label", np.full((16, 16), 13.0, np.float32), "label 13 is outside 0..12"),
    ("label", np.full((16, 16), 0.5, np.float32), "integer class ids"),
    ("depth", np.full((16, 16, 1), np.nan, np.float32), "NaN"),
    ("image", np.array(["a", "b"]), "numeric array"),
    ("image", np.zeros((8, 8, 3), np.float32), "is 8 x 8 pixels"),
])
def test_loader_malformed_array(tmp_path, kind, array, message):
    write_nyuv2(tmp_path)
    path = tmp_path / "train" / kind / "1.npy"
    np.save(path, array)
    with pytest.raises(DataFormatError) as error:
        load_nyuv2(tmp_path, "train")
    assert str(path) in str(error.value) and message in str(error.value)


def test_loader_unreadable_file(tmp_path):
    write_nyuv2(tmp_path)
    path = tmp_path / "train" / "depth" / "2.npy"
    path.write_bytes(b"not numpy")
    _expect_format_error(tmp_path, str(path))


# ------------------------------------------------------------------------------------- models
def _parameter_ids(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


@pytest.mark.parametrize("model_class", [SegNet, MTAN])
def test_models_shapes_and_unit_normals(model_class):
    torch.manual_seed(0)
    model = model_class(TASKS, filters=[4, 8, 8])
    x = torch.randn(2, 3, 32, 32)
    z, outputs = model(x)
    assert z.shape == (2, 4, 32, 32)
    assert outputs["segmentation"].shape == (2, 13, 32, 32)
    assert outputs["depth"].shape == (2, 1, 32, 32)
    assert outputs["normal"].shape == (2, 3, 32, 32)
    assert torch.allclose(outputs["normal"].norm(dim=1), torch.ones(2, 32, 32), atol=1e-5)
    # Sizes that do not halve evenly come back at full size (unpooling to each stage's size).
    _, odd = model(torch.randn(1, 3, 18, 22))
    assert odd["depth"].shape == (1, 1, 18, 22)
    with pytest.raises(ShapeError, match="H, W >= 8"):
        model(torch.randn(1, 3, 4, 4))


def test_segnet_shared_parameters():
    model = SegNet(TASKS, filters=[4, 8])
    shared, heads = _parameter_ids(model.shared), _parameter_ids(model.heads)
    assert shared and heads and not shared & heads
    assert shared | heads == _parameter_ids(model)
    # Every task's loss reaches the first shared convolution.
    _, outputs = model(torch.randn(1, 3, 16, 16))
    first = model.shared.encoder_first[0][0].weight
    for task in TASKS:
        (grad,) = torch.autograd.grad(outputs[task].square().sum(), first, retain_graph=True)
        assert grad.abs().sum() > 0, task


def test_mtan_shared_parameters():
    model = MTAN(TASKS, filters=[4, 8])
    shared = _parameter_ids(model.shared)
    task_specific = _parameter_ids(model.attention) | _parameter_ids(model.heads)
    assert not shared & task_specific and shared | task_specific == _parameter_ids(model)
    # The trunk and the attention branches' conv blocks are shared; the masks are not.
    assert _parameter_ids(model.shared.trunk) < shared
    assert _parameter_ids(model.shared.encoder_blocks) < shared
    assert _parameter_ids(model.attention["depth"]) <= task_specific


def test_representation_mode_segnet_yes_mtan_no():
    # SegNet's heads only read the representation: the engine can differentiate through it.
    # MTAN's tasks reach shared parameters without passing through it: the engine refuses.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    for model_class, works in ((SegNet, True), (MTAN, False)):
        model = model_class(TASKS, filters=[4, 8])
        z, outputs = model(x)
        losses = [outputs[t].square().mean() for t in TASKS]
        if works:
            deconflict.backward(losses, model.shared, deconflict.GradOPS(), features=z)
            assert model.shared.encoder_first[0][0].weight.grad is not None
        else:
            with pytest.raises(ShapeError, match="without passing through the features"):
                deconflict.backward(losses, model.shared, deconflict.GradOPS(), features=z)


# ------------------------------------------------------------------------------------ problem
def test_problem_metrics_and_losses():
    problem = NYUv2()
    metrics = problem.metrics({})
    assert tuple(m.name for m in metrics) == METRICS
    assert [m.higher_is_better for m in metrics] == [True, True, False, False, False, False,
                                                     True, True, True]
    assert {m.task for m in metrics} == set(TASKS)
    # Depth: valid |1 - 2| and |5 - 2| -> L1 = 2; the pixel with target 0 (error 7) is left out.
    # Normal: cosines 1 and 0 at the valid pixels -> 1 - 1/2; the zero-target pixel is left out.
    # Segmentation: the -1 pixel is ignored, so the loss is that of the labelled pixel alone.
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0]]).T.reshape(1, 2, 1, 2)
    logits = torch.cat([logits, torch.zeros(1, 11, 1, 2)], dim=1)
    outputs = {"segmentation": logits,
               "depth": torch.tensor([1.0, 5.0, 7.0]).reshape(1, 1, 1, 3),
               "normal": torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
               .T.reshape(1, 3, 1, 3)}
    targets = {"segmentation": torch.tensor([[[0, -1]]]),
               "depth": torch.tensor([2.0, 2.0, 0.0]).reshape(1, 1, 1, 3),
               "normal": torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
               .T.reshape(1, 3, 1, 3)}
    segmentation, depth, normal = problem.losses(outputs, targets, TASKS)
    # Pixel 0 has logits 2 (class 0) and 0 elsewhere: -log(e^2 / (e^2 + 12)).
    assert segmentation.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 12)))
    assert depth.item() == pytest.approx(2.0)
    assert normal.item() == pytest.approx(0.5)


@pytest.fixture(scope="module")
def nyuv2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nyuv2")
    write_nyuv2(root, counts=(("train", 4), ("val", 3)))
    return root


@pytest.mark.parametrize("overrides", [{}, {"model": "mtan"}, {"representation": True}])
def test_smoke_training_gives_finite_metrics(nyuv2_root, overrides):
    problem = NYUv2()
    config = problem.resolve_config({"data": str(nyuv2_root), **overrides}, smoke=True)
    result = problem.train(lambda: deconflict.GradOPS(), config, seed=0,
                           device=torch.device("cpu"))
    for split in ("validation", "test"):
        assert tuple(result.metrics[split]) == METRICS
        assert all(math.isfinite(v) for v in result.metrics[split].values()), result.metrics
    assert result.metrics["validation"] == result.metrics["test"]  # both are the val images
    assert "both validation and test" in result.note
    assert result.statistics["steps"] == 2  # 4 images, batch 2, 1 epoch


def test_validation_fraction_holds_out_training_images(nyuv2_root):
    problem = NYUv2()
    config = problem.resolve_config({"data": str(nyuv2_root), "validation_fraction": 0.5},
                                    smoke=True)
    data = problem.load(config)
    train = load_nyuv2(nyuv2_root, "train")
    assert (len(data.train), len(data.validation), len(data.test)) == (2, 2, 3)
    assert torch.equal(data.validation.inputs, train.images[2:])


def test_mtan_refuses_representation_mode(nyuv2_root):
    problem = NYUv2()
    config = problem.resolve_config({"data": str(nyuv2_root), "model": "mtan",
                                     "representation": True}, smoke=True)
    with pytest.raises(InvalidOptionError, match="representation mode is not supported"):
        problem.train(lambda: deconflict.GradOPS(), config, 0, torch.device("cpu"))
    config["representation"] = False
    with pytest.raises(InvalidOptionError, match="mgda_ub works on the shared representation"):
        problem.train(lambda: deconflict.MGDAUB(), config, 0, torch.device("cpu"))
    config["model"] = "unet"
    with pytest.raises(InvalidOptionError, match="model must be one of segnet, mtan"):
        problem.train(lambda: deconflict.GradOPS(), config, 0, torch.device("cpu"))


# ------------------------------------------------------------- Recon on SegNet and MTAN
def _numel(parameters) -> int:
    return sum(p.numel() for p in parameters)


@pytest.mark.parametrize(("model", "layers"), [
    ("segnet", ["encoder_first.1"]), ("segnet", ["encoder_rest.0", "decoder_first.1"]),
    ("mtan", ["trunk.encoder_first.1"]), ("mtan", ["encoder_blocks.0", "decoder_blocks.1"]),
])
def test_branched_training_on_segnet_and_mtan(nyuv2_root, model, layers):
    problem = NYUv2()
    config = problem.resolve_config({"data": str(nyuv2_root), "model": model,
                                     "branch": layers}, smoke=True)
    plain_config = {**config, "branch": []}
    data = problem.load(config)
    plain = problem.model_for(plain_config, TASKS, data, seed=0)
    copied = _numel(p for layer in layers for p in plain.shared.get_submodule(layer).parameters())
    branched = problem.model_for(config, TASKS, data, seed=0)
    assert _numel(branched.parameters()) == _numel(plain.parameters()) + 2 * copied
    shared = _numel(p for _, p in branched.shared_parameters())
    assert shared == _numel(p for _, p in plain.shared_parameters()) - copied
    result = problem.train(lambda: deconflict.GradOPS(), config, seed=0,
                           device=torch.device("cpu"))
    assert all(math.isfinite(v) for v in result.metrics["test"].values()), result.metrics
    assert result.statistics["shared_parameters"] == shared
    assert result.statistics["strong_non_conflict_fraction"] == 1.0


def test_branched_mtan_computes_the_original_and_splits_the_gradients(monkeypatch):
    from deconflict.recon import BranchedModule

    torch.manual_seed(0)
    model = MTAN(TASKS, filters=[4, 8]).eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)[1]
    with monkeypatch.context() as patch:  # keep the copies at the original weights
        patch.setattr(BranchedModule, "reset_branches", lambda self: None)
        model.branch(["trunk.encoder_first.1", "decoder_blocks.0"], len(TASKS))
    assert not hasattr(model, "attention")
    for task, out in model(x)[1].items():
        torch.testing.assert_close(out, expected[task], rtol=0, atol=1e-5)
    # Each task's attention path (its first decoder mask's convolution, a leaf of the traced
    # body) runs once per forward pass, in its own stream.
    calls = []
    for task in TASKS:
        model.shared.trunk.get_submodule(f"attention.{task}.decoder.0.0").register_forward_hook(
            lambda *_, task=task: calls.append(task))
    model.train()
    _, outputs = model(x)
    assert sorted(calls) == sorted(TASKS)
    shared = {id(p) for _, p in model.shared_parameters()}
    assert not any(n.startswith("attention.") for n, _ in model.shared_parameters())
    for t, task in enumerate(TASKS):
        model.zero_grad(set_to_none=True)
        _, outputs = model(x)
        outputs[task].square().mean().backward()
        for other in range(len(TASKS)):
            for name, p in model.shared.task_parameters(other):
                assert (p.grad is not None and bool(p.grad.any())) == (other == t), name
        for name, p in model.named_parameters():
            if id(p) in shared:
                assert p.grad is not None and p.grad.abs().sum() > 0, (task, name)
    with pytest.raises(InvalidOptionError, match="branched already"):
        model.branch(["encoder_blocks.1"], len(TASKS))


# ------------------------------------------------------------------ learning-rate schedule
def test_learning_rate_is_halved_after_epoch_100_like_step_lr():
    problem = NYUv2()
    config = problem.resolve_config()
    assert (config["lr"], config["lr_step"], config["lr_decay"]) == (1e-4, 100, 0.5)
    # torch's StepLR(step_size=100, gamma=0.5), stepped once per epoch as in the MTAN code.
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    reference = {}
    for epoch in range(202):
        reference[epoch] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    for epoch in (0, 99, 100, 101, 199, 200, 201):
        assert problem.learning_rate(config, epoch) == pytest.approx(reference[epoch],
                                                                     rel=1e-15)
    assert problem.learning_rate(config, 99) == 1e-4
    assert problem.learning_rate(config, 100) == problem.learning_rate(config, 101) == 5e-5
    assert problem.learning_rate({**config, "lr_step": None}, 150) == 1e-4


def test_training_uses_each_epochs_learning_rate(nyuv2_root, monkeypatch):
    problem = NYUv2()
    config = problem.resolve_config({"data": str(nyuv2_root), "epochs": 3, "lr_step": 1,
                                     "lr_decay": 0.25}, smoke=True)
    seen: list[tuple[int, float]] = []
    step_losses = problem.step_losses

    def recording(run, inputs, targets):
        optimizer = problem._optimizers[run.model]
        seen.append((run.epoch, optimizer.param_groups[0]["lr"]))
        return step_losses(run, inputs, targets)

    monkeypatch.setattr(problem, "step_losses", recording)
    problem.train(lambda: deconflict.Sum(), config, 0, torch.device("cpu"))
    # 4 images, batch 2: two steps per epoch at lr 1e-3 * 0.25^epoch.
    assert seen == [(e, pytest.approx(1e-3 * 0.25 ** e, rel=1e-15)) for e in (0, 0, 1, 1, 2, 2)]


def test_branched_models_still_check_the_input_size():
    for model in (SegNet(TASKS, filters=[4, 8]), MTAN(TASKS, filters=[4, 8])):
        if isinstance(model, MTAN):
            model.branch(["trunk.encoder_first.1"], len(TASKS))
        else:
            from deconflict.recon import branch

            model.shared = branch(model.shared, ["encoder_first.1"], len(TASKS))
        with pytest.raises(ShapeError, match="H, W >= 4"):
            model(torch.randn(1, 3, 2, 2))
