"""Per-module caches derived from buffers (prepacked kernel layouts), rebuilt when they change."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def version_of(t: torch.Tensor) -> int:
    """The in-place version counter of ``t`` (-1 for inference tensors, which have none: they
    can only change inside ``torch.inference_mode``)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def cached_on(module: nn.Module, name: str, tensors: tuple[torch.Tensor, ...],
              build: Callable[[], Any]) -> Any:
    """``build()``'s value, kept in ``module.__dict__[name]`` while ``tensors`` stay the same
    objects with the same versions (so ``.to()``, ``load_state_dict`` and in-place edits all
    rebuild it). The module should drop ``name`` from its pickled state (a cache)."""
    try:  # (the common case in one expression: this runs on every forward)
        versions = tuple(t._version for t in tensors)
    except RuntimeError:  # an inference tensor among them
        versions = tuple(version_of(t) for t in tensors)
    cache = module.__dict__.get(name)
    if (cache is None or cache[1] != versions or len(cache[0]) != len(tensors)
            or not all(map(operator.is_, cache[0], tensors))):
        cache = module.__dict__[name] = (tensors, versions, build())
    return cache[2]
