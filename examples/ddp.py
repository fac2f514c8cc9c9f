"""Multi-task training on several processes with deconflict (data parallel).

    torchrun --nproc_per_node=2 examples/ddp.py --mode exact    # 2 processes
    torchrun --nproc_per_node=2 examples/ddp.py --mode local --ddp
    python examples/ddp.py                                        # 1 process (world size 1)

Each rank trains on its own shard of a synthetic 3-task regression set (DistributedSampler with
drop_last: every rank's batch has the same size). ``--mode exact`` averages the per-task
gradients over the ranks before the method runs: the single-process update on the global batch.
``--mode local`` runs the method on each rank's batch and averages the updates: plain DDP's
communication, an approximation of the method. ``--ddp`` wraps the model in
DistributedDataParallel; its forward and backward then run under ``model.no_sync()``, because
deconflict does the communication itself. gloo on the CPU, NCCL when CUDA is available.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import deconflict
from deconflict.distributed import broadcast_parameters, global_losses
from deconflict.methods import AfterStep

TASKS = 3


class MultiTaskNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(64, 1) for _ in range(TASKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1)


def synthetic_tasks(samples: int = 4096) -> TensorDataset:
    """Three regression targets, the second partly the opposite of the first (conflicts)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 16, generator=generator)
    w = torch.randn(16, TASKS, generator=generator) / 4
    a, b, c = (x @ w).unbind(dim=1)
    y = torch.stack([torch.sin(a), torch.cos(b) - torch.sin(a), c], dim=1)
    return TensorDataset(x, y)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["exact", "local"], default="exact")
    parser.add_argument("--method", default="gradops", help="a deconflict method name")
    parser.add_argument("--ddp", action="store_true", help="wrap the model in DDP")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    args = parser.parse_args()

    if "RANK" not in os.environ:  # plain `python examples/ddp.py`: a group of one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    net = MultiTaskNet().to(device)
    if args.ddp:
        model = DistributedDataParallel(net)  # copies rank 0's parameters to every rank
    else:
        model = net
        broadcast_parameters(net)  # what DDP would have done
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    method = deconflict.get(args.method)  # once: stateful methods keep their state in it

    data = synthetic_tasks()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        total = torch.zeros(TASKS)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            # Under DDP, no_sync: DDP must not reduce gradients itself (deconflict does).
            with model.no_sync() if args.ddp else contextlib.nullcontext():
                out = model(x)
                losses = [nn.functional.mse_loss(out[:, t], y[:, t]) for t in range(TASKS)]
                deconflict.backward(losses, net.trunk, method, distributed=args.mode)
            optimizer.step()
            if isinstance(method, AfterStep):  # FAMO: the same losses on every rank
                with torch.no_grad():
                    out = model(x)
                    after = [nn.functional.mse_loss(out[:, t], y[:, t]) for t in range(TASKS)]
                method.after_step(global_losses(after) if args.mode == "exact" else after)
            total += torch.stack([loss.detach().cpu() for loss in losses])
        print(f"rank {rank}/{world} epoch {epoch}: mean losses on this rank's shard "
              f"{[round(v, 4) for v in (total / len(loader)).tolist()]}", flush=True)

    # Every rank applied the same averaged gradients, so the replicas are still identical.
    checksum = torch.stack([p.detach().double().sum() for p in net.parameters()]).sum()
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        print(f"parameters identical on the {world} ranks: "
              f"{all(torch.equal(s, sums[0]) for s in sums)}")
    dist.barrier()  # every rank done with its collectives before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
