"""Multi-task learning with deconflict in a Lightning module.

Three regression tasks share a trunk. Tasks a and b read the shared features in nearly opposite
directions, so their gradients on the trunk conflict and a summed update trades one against the
other. The module turns Lightning's automatic optimization off and lets deconflict do each step
(``deconflict.lightning``): GradOPS with alpha = -1 removes the conflicting components and gives
more weight to the tasks the combined update serves least. The data are generated in code;
nothing is downloaded.

    python examples/lightning_mtl.py --max-steps 200
    python examples/lightning_mtl.py --method famo       # any method, by name

Needs Lightning: pip install 'deconflict[lightning]'.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import deconflict
from deconflict.lightning import DeconflictMixin

TASKS = ("a", "b", "c")


def make_data(samples: int = 256, inputs: int = 8, seed: int = 0) -> TensorDataset:
    """Inputs x and one target column per task, read from a shared latent representation."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=generator)
    latent = torch.tanh(x @ torch.randn(inputs, 4, generator=generator))
    readout = torch.randn(4, len(TASKS), generator=generator)
    # Task b wants roughly the opposite of task a from the same features: conflicting gradients.
    readout[:, 1] = -readout[:, 0] + 0.3 * readout[:, 1]
    noise = 0.05 * torch.randn(samples, len(TASKS), generator=generator)
    return TensorDataset(x, latent @ readout + noise)


class MultiTaskRegressor(DeconflictMixin, pl.LightningModule):
    """A shared trunk and one linear head per task, trained with a deconflict method."""

    def __init__(self, method: deconflict.Method, inputs: int = 8, hidden: int = 32,
                 lr: float = 1e-2) -> None:
        super().__init__()
        # deconflict.backward replaces self.manual_backward, so the step is ours to do.
        self.automatic_optimization = False
        self.mtl_method = method
        self.lr = lr
        self.trunk = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(),
                                   nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in TASKS)

    def task_losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        features = self.trunk(x)
        return [nn.functional.mse_loss(head(features).squeeze(-1), y[:, t])
                for t, head in enumerate(self.heads)]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        losses = self.task_losses(x, y)
        # losses_after_step is only called by the methods that need it (FAMO).
        self.deconflict_step(losses, self.trunk, task_names=TASKS,
                             losses_after_step=lambda: self.task_losses(x, y))
        self.log_dict({f"loss/{task}": loss.detach()
                       for task, loss in zip(TASKS, losses, strict=True)},
                      on_step=True, on_epoch=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_method(name: str) -> deconflict.Method:
    """The method by name; GradOPS with alpha = -1, the others with their defaults."""
    return deconflict.get(name, **({"alpha": -1.0} if name == "gradops" else {}))


def build(method: str | deconflict.Method = "gradops", max_steps: int = 20,
          batch_size: int = 64, seed: int = 0, log_dir: str | None = None,
          ) -> tuple[MultiTaskRegressor, pl.Trainer, DataLoader]:
    """The module, a CPU trainer stopping after ``max_steps`` and the training data loader."""
    torch.manual_seed(seed)
    model = MultiTaskRegressor(make_method(method) if isinstance(method, str) else method)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1,
        logger=CSVLogger(log_dir, name="lightning_mtl") if log_dir else False,
        log_every_n_steps=10, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    # In order, so that a run and a resumed run see the same batches.
    loader = DataLoader(make_data(seed=seed), batch_size=batch_size, shuffle=False)
    return model, trainer, loader


@torch.no_grad()
def evaluate(model: MultiTaskRegressor, loader: DataLoader) -> list[float]:
    """Each task's mean squared error over the whole data set."""
    x, y = loader.dataset.tensors
    return [loss.item() for loss in model.task_losses(x, y)]


def main(argv: Sequence[str] | None = None) -> MultiTaskRegressor:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--method", default="gradops", help="a deconflict method name")
    parser.add_argument("--log-dir", help="write the logged metrics as CSV here")
    args = parser.parse_args(argv)
    # A model this small trains fastest on one thread (more only add synchronization).
    torch.set_num_threads(1)

    model, trainer, loader = build(args.method, args.max_steps, log_dir=args.log_dir)
    before = evaluate(model, loader)
    # Four in-memory batches per epoch: worker processes would only add start-up time.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    trainer.fit(model, loader)
    after = evaluate(model, loader)
    for task, start, end in zip(TASKS, before, after, strict=True):
        print(f"task {task}: mse {start:.4f} -> {end:.4f}")
    return model


if __name__ == "__main__":
    main()
