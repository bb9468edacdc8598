"""Drop-in layers of subkern's sparse methods.

Edge-popup: ``SubnetLinear``, ``SubnetConv2d`` (frozen weights, trainable scores, top-k mask),
``NonAffineBatchNorm2d`` and the init modes of ``subkern.nn.init``; for deployment,
``SupermaskLinear`` and ``SupermaskConv2d`` (bit-packed mask + sign bits, one scale per layer).
"""

from __future__ import annotations

from .batchnorm import NonAffineBatchNorm2d
from .init import INIT_MODES, init_scores_, init_weight_, seeded_signs
from .lowrank import FactorizedLinear, STRFastGRNN, STRFastGRNNCell, STRLowRankLinear
from .sparse import SparseConv2d, SparseLinear, fuse_relu_
from .str import STRConv2d, STRLinear, STRMixin, overall_sparsity, str_modules
from .subnet import (
    SubnetConv2d,
    SubnetLinear,
    SubnetMixin,
    kept_fraction,
    set_k_,
    subnet_modules,
)
from .supermask import SupermaskConv2d, SupermaskLinear

__all__ = [
    "INIT_MODES",
    "FactorizedLinear",
    "NonAffineBatchNorm2d",
    "SubnetConv2d",
    "SubnetLinear",
    "SubnetMixin",
    "SparseConv2d",
    "SparseLinear",
    "STRConv2d",
    "STRFastGRNN",
    "STRFastGRNNCell",
    "STRLinear",
    "STRMixin",
    "STRLowRankLinear",
    "SupermaskConv2d",
    "SupermaskLinear",
    "fuse_relu_",
    "init_scores_",
    "init_weight_",
    "kept_fraction",
    "overall_sparsity",
    "seeded_signs",
    "set_k_",
    "str_modules",
    "subnet_modules",
]
