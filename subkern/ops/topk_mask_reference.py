"""Plain-torch reference of edge-popup's top-k score masking (the ground truth).

Edge-popup ("What's Hidden in a Randomly Weighted Neural Network?", Ramanujan et al., 2020) keeps,
in every layer, the fraction ``k`` of weights with the largest scores ``|s|``. The official
``GetSubnet`` sorts the scores and zeroes the ``j = floor((1 - k) * n)`` smallest, so the kept
count is ``n - floor((1 - k) * n)``.

subkern makes the choice deterministic: entries are ranked by ``(|s| descending, flat index
ascending)`` and the first ``n - j`` are kept, so among equal scores the lower flat index wins, on
every backend. NaN scores rank below every number (never kept while a number is left); ``+inf``
ranks above every finite score.
"""

from __future__ import annotations

import math

import torch


def kept_count(numel: int, k: float) -> int:
    """``n - floor((1 - k) * n)``, the number of entries edge-popup's GetSubnet keeps."""
    return numel - int(math.floor((1.0 - k) * numel))


def _ranking_keys(scores: torch.Tensor) -> torch.Tensor:
    """``|s|`` in float64 (exact for every float dtype) with NaN mapped to -1, below every
    ``|s| >= 0``: a sortable key (larger = kept first)."""
    mag = scores.detach().abs().to(torch.float64).flatten()
    return torch.where(torch.isnan(mag), torch.full_like(mag, -1.0), mag)


def topk_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """0/1 mask (dtype of ``scores``) keeping the ``kept_count`` largest ``|scores|``."""
    n = scores.numel()
    keep = kept_count(n, k)
    mask = torch.zeros(n, dtype=scores.dtype, device=scores.device)
    if keep > 0:
        keys = _ranking_keys(scores)
        # stable sort on descending key keeps index order among equal keys
        order = torch.sort(keys, descending=True, stable=True).indices
        mask[order[:keep]] = 1
    return mask.view_as(scores)


def topk_threshold(scores: torch.Tensor, k: float) -> torch.Tensor:
    """The smallest kept ``|score|`` (a 0-d tensor of ``scores``' dtype); ``+inf`` if none kept.

    ``|s| > t`` entries are all kept; entries with ``|s| == t`` are kept in flat-index order until
    the kept count is reached.
    """
    n = scores.numel()
    keep = kept_count(n, k)
    if keep == 0:
        return torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    keys = _ranking_keys(scores)
    value = torch.topk(keys, keep, largest=True, sorted=True).values[-1]
    if value < 0:  # only NaN left at the boundary
        return torch.tensor(float("nan"), dtype=scores.dtype, device=scores.device)
    return value.to(scores.dtype)
