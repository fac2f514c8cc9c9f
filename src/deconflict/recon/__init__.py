"""Recon (Shi et al., ICLR 2023): branch the shared layers where task gradients conflict most."""

from .branch import BranchedModule, TaskTrunk, branch

__all__ = ["BranchedModule", "TaskTrunk", "branch"]
