"""Shared pieces of subkern's reference trainers: seeding, the training loop, atomic
checkpoints with resume, and DDP set-up through torchrun."""

from __future__ import annotations

from .checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from .distributed import DistInfo, cleanup, init_distributed, process_group, resolve_device
from .loop import FitConfig, cosine_lr, evaluate, fit, seed_everything

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "DistInfo",
    "FitConfig",
    "cleanup",
    "cosine_lr",
    "evaluate",
    "fit",
    "init_distributed",
    "load_checkpoint",
    "process_group",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
]
