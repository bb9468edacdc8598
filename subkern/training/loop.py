"""A small, deterministic supervised training loop shared by the reference trainers.

Determinism: every source of randomness of an epoch is derived from ``(seed, epoch, rank)``: the
shuffling (``DistributedSampler(seed=seed).set_epoch(epoch)``, used with one replica too), the
augmentation generator, and the learning rate (a function of the epoch). A run resumed from the
checkpoint of epoch ``e`` therefore continues bit-identically to an uninterrupted run (same
threads, same device). ``--batch-size`` is the global batch; each of the ``W`` processes takes
``batch_size / W`` samples per step, and DDP averages the gradients.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .distributed import DistInfo

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cosine_lr(base_lr: float, epoch: int, epochs: int, warmup: int = 0) -> float:
    """Official ``cosine_lr``: linear warm-up, then ``0.5 (1 + cos(pi e / E)) lr`` per epoch."""
    if epoch < warmup:
        return base_lr * (epoch + 1) / warmup
    span = max(epochs - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span)) * base_lr


@dataclass
class FitConfig:
    """Settings of ``fit``. ``meta`` is stored in checkpoints and must match on resume."""

    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    warmup: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    eval_batch_size: int = 1024
    progress: bool = True
    checkpoint_path: str | None = None
    resume_path: str | None = None
    augment: Augment | None = None
    stop_after: int | None = None      # end this invocation after that epoch (resume later)
    num_workers: int = 0               # DataLoader worker processes (decoding data sets)
    meta: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] | None = print


def _reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64,
                          device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: torch.device,
             batch_size: int = 1024, info: DistInfo | None = None,
             num_workers: int = 0) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (shards over ranks and sums when distributed)."""
    info = info or DistInfo(device=device)
    indices = list(range(info.rank, len(data), info.world_size))
    was_training = model.training
    model.eval()
    correct = 0
    if isinstance(data, TensorDataset):   # in memory: slice whole batches
        batches: Iterable = (data[indices[start:start + batch_size]]
                             for start in range(0, len(indices), batch_size))
    else:                                 # decoded per item (e.g. ImageNet from JPEGs)
        batches = DataLoader(Subset(data, indices), batch_size=batch_size,
                             num_workers=num_workers)
    for x, y in batches:
        logits = model(x.to(device))
        correct += int((logits.argmax(dim=1).cpu() == y).sum())
    model.train(was_training)
    total_correct, total = _reduce_sum([float(correct), float(len(indices))], info)
    return total_correct / total if total else math.nan


def _check_resume(state: dict, config: FitConfig) -> None:
    saved = state.get("meta", {})
    for key, value in config.meta.items():
        if key in saved and saved[key] != value:
            raise CheckpointError(f"cannot resume: checkpoint has {key}={saved[key]!r}, this run "
                                  f"{key}={value!r}")
    if state.get("seed") != config.seed:
        raise CheckpointError(f"cannot resume: checkpoint seed {state.get('seed')}, "
                              f"this run {config.seed}")


def fit(model: nn.Module, train_data: Dataset, test_data: Dataset,
        optimizer: torch.optim.Optimizer, config: FitConfig,
        info: DistInfo | None = None) -> list[dict[str, float]]:
    """Train ``model`` (already on ``info.device``) with cross-entropy; returns the history.

    Every epoch: set the cosine learning rate, one pass over the shuffled training set, the test
    accuracy, and (rank 0) an atomic checkpoint to ``config.checkpoint_path``. With
    ``config.resume_path`` the model, optimizer, history and RNG state are restored first and
    training continues after the saved epoch. ``config.stop_after`` ends the invocation early
    (e.g. to fit a job time limit); the schedule still spans ``config.epochs``.
    """
    info = info or DistInfo()
    device = info.device
    say = config.log if (config.log is not None and info.is_main) else (lambda _msg: None)
    if config.batch_size % info.world_size:
        raise ValueError(f"batch size {config.batch_size} is not divisible by the world size "
                         f"{info.world_size}")
    history: list[dict[str, float]] = []
    start_epoch = 0
    if config.resume_path:
        state = load_checkpoint(config.resume_path, map_location=device)
        _check_resume(state, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        torch.set_rng_state(state["torch_rng"].cpu())
        say(f"resumed from {config.resume_path} after epoch {start_epoch}")
    trained = model
    if info.distributed:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    per_rank = config.batch_size // info.world_size
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        lr = cosine_lr(config.lr, epoch, config.epochs, config.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler = DistributedSampler(train_data, num_replicas=info.world_size, rank=info.rank,
                                     shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
        if hasattr(train_data, "set_epoch"):   # per-epoch random transforms (ImageNet)
            train_data.set_epoch(epoch)
        loader = DataLoader(train_data, batch_size=per_rank, sampler=sampler,
                            num_workers=config.num_workers)
        augment_rng = torch.Generator().manual_seed(
            (config.seed * 1_000_003 + epoch * 7_919 + info.rank) % 2**63)
        trained.train()
        loss_sum = correct = seen = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not (config.progress and info.is_main))
        for x, y in bar:
            if config.augment is not None:
                x = config.augment(x, augment_rng)
            x, y = x.to(device), y.to(device)
            logits = trained(x)
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += float((logits.detach().argmax(dim=1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.4g}")
        loss_sum, correct, seen = _reduce_sum([loss_sum, correct, seen], info)
        test_acc = evaluate(model, test_data, device, config.eval_batch_size, info,
                            config.num_workers)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(seen, 1),
                  "train_acc": correct / max(seen, 1), "test_acc": test_acc,
                  "seconds": time.perf_counter() - started}
        history.append(record)
        say(f"epoch {epoch + 1}/{config.epochs}: lr {lr:.4g}  train loss "
            f"{record['train_loss']:.4f}  train acc {record['train_acc']:.4f}  test acc "
            f"{test_acc:.4f}  ({record['seconds']:.1f} s)")
        if config.checkpoint_path and info.is_main:
            save_checkpoint(config.checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1, "history": history, "seed": config.seed,
                "meta": config.meta, "torch_rng": torch.get_rng_state()})
        if info.distributed:
            dist.barrier()
        if config.stop_after is not None and epoch + 1 >= config.stop_after:
            say(f"stopping after epoch {epoch + 1} (resume with the checkpoint)")
            break
    return history
