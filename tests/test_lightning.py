"""The Lightning adapter (``deconflict.lightning``) and examples/lightning_mtl.py.

The example trains; one Lightning step writes exactly the update ``deconflict.backward`` writes
outside Lightning; the method's state goes into Lightning checkpoints and a resumed run continues
exactly; and misuse (FAMO without the losses after the step, 16-bit loss scaling, the mixin
after LightningModule, Lightning not installed) gets a clear error.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

import deconflict
from deconflict.errors import InvalidOptionError
from deconflict.lightning import (
    CHECKPOINT_KEY,
    DeconflictMixin,
    load_method_state,
    save_method_state,
)
from deconflict.methods import AfterStep, EpochEnd

pytestmark = [
    # The example's four in-memory batches need no loader workers.
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    # Lightning 2.6 calls a torch.utils._pytree API that newer PyTorch deprecates.
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_mtl.py"
STEPS_PER_EPOCH = 4  # 256 samples in batches of 64


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("lightning_mtl", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quiet_trainer(**options) -> pl.Trainer:
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False}
    return pl.Trainer(**{**settings, **options})


def states_equal(a, b) -> bool:
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(states_equal(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(states_equal(x, y) for x, y in zip(a, b, strict=True)))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


# ------------------------------------------------------------------------------ the example
def test_the_example_trains(example, capsys):
    initial = [p.detach().clone() for p in example.build()[0].parameters()]
    model = example.main(["--max-steps", "20"])

    mse = re.findall(r"task (\w): mse ([\d.]+) -> ([\d.]+)", capsys.readouterr().out)
    assert [task for task, _, _ in mse] == list(example.TASKS)
    assert all(float(end) < 0.5 * float(start) for _, start, end in mse)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), initial, strict=True))


def test_a_lightning_step_writes_the_update_of_deconflict_backward(example):
    model, trainer, loader = example.build("gradops", max_steps=1)
    reference = copy.deepcopy(model)
    trainer.fit(model, loader)

    x, y = next(iter(loader))
    optimizer = torch.optim.Adam(reference.parameters(), lr=reference.lr)
    losses = reference.task_losses(x, y)
    trunk_sum = torch.autograd.grad(sum(losses), list(reference.trunk.parameters()),
                                    retain_graph=True)
    optimizer.zero_grad()
    record = deconflict.backward(losses, reference.trunk, deconflict.get("gradops", alpha=-1))
    optimizer.step()

    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=f"gradient of {name}")
        torch.testing.assert_close(p, q, msg=f"{name} after the step")
    # The comparison can tell GradOPS from the plain sum: the tasks conflict on this batch.
    assert record.conflicting_pairs
    assert any(not torch.allclose(p.grad, g, rtol=1e-3)
               for p, g in zip(model.trunk.parameters(), trunk_sum, strict=True))
    logged = trainer.callback_metrics
    for t, task in enumerate(example.TASKS):
        assert logged[f"deconflict/weight_{task}"].item() == pytest.approx(
            record.weights[t].item(), rel=1e-6)
    assert logged["deconflict/conflicting_pairs"].item() == len(record.conflicting_pairs)


def test_famo_gets_the_losses_after_each_step(example):
    model, trainer, loader = example.build("famo", max_steps=3)
    trainer.fit(model, loader)
    famo = model.mtl_method
    assert famo.pending is None  # after_step came after every step
    assert not np.allclose(famo.logits.values, 0.0)


# -------------------------------------------------------------------------- checkpointing
# The resumed run checkpoints into the directory it resumes from, as a real resumed run does.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_resumed_run_continues_the_method_exactly(example, tmp_path):
    # DWA weights epoch 3 from the mean losses of epochs 1 and 2, which only the checkpoint
    # carries across the interruption (as NumPy arrays, which torch.load's default
    # weights_only=True refuses unless the adapter stores them as tensors).
    # max_epochs, not max_steps: Lightning 2.6 replays a batch when an iteration-based run
    # resumes from an end-of-epoch checkpoint, with or without deconflict.
    epochs = 3
    straight, _, loader = example.build("dwa")
    trainer = quiet_trainer(max_epochs=epochs, enable_checkpointing=True,
                            callbacks=[ModelCheckpoint(tmp_path, save_top_k=-1)])
    trainer.fit(straight, loader)
    assert trainer.callback_metrics["deconflict/weight_a"].item() != 1.0
    path = tmp_path / f"epoch={epochs - 2}-step={(epochs - 1) * STEPS_PER_EPOCH}.ckpt"
    saved = torch.load(path, weights_only=True)[CHECKPOINT_KEY]
    assert saved["method"] == "dwa" and len(saved["state"]["history"]) == epochs - 1

    resumed, _, loader = example.build("dwa")
    trainer = quiet_trainer(max_epochs=epochs, enable_checkpointing=True,
                            callbacks=[ModelCheckpoint(tmp_path, save_top_k=-1)])
    trainer.fit(resumed, loader, ckpt_path=path)
    assert states_equal(resumed.mtl_method.state_dict(), straight.mtl_method.state_dict())
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_checkpoint_loads_into_a_fresh_module(example, tmp_path):
    model, trainer, loader = example.build("gradvac", max_steps=3)
    trainer.fit(model, loader)
    path = tmp_path / "gradvac.ckpt"
    trainer.save_checkpoint(path)

    method = deconflict.get("gradvac")
    loaded = example.MultiTaskRegressor.load_from_checkpoint(path, method=method)
    assert loaded.mtl_method is method
    assert states_equal(method.state_dict(), model.mtl_method.state_dict())
    assert not states_equal(method.state_dict(), deconflict.get("gradvac").state_dict())


@pytest.mark.parametrize("name", ["dwa", "famo", "gradnorm", "gradvac"])
def test_the_stored_state_loads_with_weights_only(name):
    method = deconflict.get(name)
    for step in range(3):
        torch.manual_seed(step)
        trunk = torch.nn.Linear(4, 4)
        features = trunk(torch.randn(8, 4))
        losses = [features[:, t].pow(2).mean() for t in range(3)]
        deconflict.backward(losses, trunk, method)
        if isinstance(method, AfterStep):
            method.after_step(torch.stack(losses).detach() * 0.9)
        if isinstance(method, EpochEnd):
            method.end_epoch()
    if name == "famo":  # mid-step, with its pending NumPy losses
        features = trunk(torch.randn(8, 4))
        deconflict.backward([features[:, t].pow(2).mean() for t in range(3)], trunk, method)
    checkpoint = {}
    save_method_state(method, checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    restored = deconflict.get(name)
    load_method_state(restored, torch.load(buffer, weights_only=True))
    assert states_equal(restored.state_dict(), method.state_dict())


def test_the_state_of_another_method_is_refused():
    checkpoint = {}
    save_method_state(deconflict.get("dwa"), checkpoint)
    with pytest.raises(InvalidOptionError, match="state of dwa, not of famo"):
        load_method_state(deconflict.get("famo"), checkpoint)
    with pytest.warns(UserWarning, match="starts from a fresh state"):
        load_method_state(deconflict.get("famo"), {})


# --------------------------------------------------------------------------------- misuse
def test_famo_without_losses_after_step_is_refused_before_any_update(example):
    class Forgetful(example.MultiTaskRegressor):
        def training_step(self, batch, batch_idx):
            self.deconflict_step(self.task_losses(*batch), self.trunk)

    torch.manual_seed(0)
    model = Forgetful(deconflict.get("famo"))
    initial = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(InvalidOptionError, match="famo needs the losses after the optimizer"):
        quiet_trainer(max_steps=1).fit(model, example.build()[2])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial, strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_float16_with_the_plugins_scaler_and_bf16_train(example):
    """16-mixed: the plugin's GradScaler goes to deconflict.backward (scaled losses), and the
    plugin's optimizer step unscales them: after one step, .grad is the true gradient (close to
    the 32-bit run's; unscaled twice or not at all it would be off by the scale).
    bf16-mixed needs no scaler."""
    grads = {}
    for name, options in (
            ("32", {}),
            ("16", {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler(
                "cpu", init_scale=2.0**8))]}),
            ("bf16", {"precision": "bf16-mixed"})):
        torch.manual_seed(0)
        model, _, loader = example.build()
        initial = [p.detach().clone() for p in model.parameters()]
        quiet_trainer(max_steps=1, **options).fit(model, loader)
        assert all(torch.isfinite(p).all() and not torch.equal(p, q)
                   for p, q in zip(model.parameters(), initial, strict=True)), name
        grads[name] = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
    for name in ("16", "bf16"):
        ratio = grads[name].norm() / grads["32"].norm()
        cosine = torch.nn.functional.cosine_similarity(grads[name], grads["32"], dim=0)
        assert 0.9 < ratio < 1.1 and cosine > 0.99, (name, ratio, cosine)


def test_float16_overflow_skips_the_step_like_the_scaler(example):
    """At the default scale 2**16 the scaled float16 losses overflow on the first batch: the
    step is skipped (parameters unchanged) and the scale halves, as in plain AMP."""
    torch.manual_seed(0)
    model, _, loader = example.build()
    initial = [p.detach().clone() for p in model.parameters()]
    plugin = MixedPrecision("16-mixed", "cpu")
    quiet_trainer(max_steps=1, plugins=[plugin]).fit(model, loader)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial, strict=True))
    assert plugin.scaler.get_scale() == 2.0**15


def test_automatic_optimization_is_refused(example):
    model, _, loader = example.build()
    model.automatic_optimization = True
    with pytest.raises(InvalidOptionError, match="automatic_optimization = False"):
        quiet_trainer(max_steps=1).fit(model, loader)


def test_the_mixin_must_come_before_lightning_module():
    with pytest.raises(TypeError, match="before LightningModule"):
        type("Backwards", (pl.LightningModule, DeconflictMixin), {})


# -------------------------------------------------------------------- optional dependency
def test_without_lightning_the_import_error_says_what_to_install(monkeypatch):
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # None makes the import fail
    monkeypatch.delitem(sys.modules, "deconflict.lightning")
    with pytest.raises(ImportError, match=re.escape("pip install 'deconflict[lightning]'")):
        importlib.import_module("deconflict.lightning")


def test_importing_deconflict_does_not_import_lightning():
    code = "import sys, deconflict; print(sorted(m for m in sys.modules if 'lightning' in m))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
