"""Non-affine BatchNorm, as edge-popup uses it: normalisation only, nothing learned."""

from __future__ import annotations

from torch import nn


class NonAffineBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d(num_features, affine=False)``: ``y = (x - mean) / sqrt(var + eps)``.

    Edge-popup trains only the scores, so its BatchNorm layers carry no weight or bias (official
    ``NonAffineBatchNorm``); running statistics are still tracked for evaluation.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
