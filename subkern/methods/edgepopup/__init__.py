"""Edge-popup reference training ("What's Hidden in a Randomly Weighted Neural Network?",
Ramanujan et al., CVPR 2020): the paper's models, its recipe and a trainer.

    from subkern.methods.edgepopup import EdgePopupRecipe, train_edgepopup
    result = train_edgepopup(EdgePopupRecipe(data="digits", k=0.5, init="signed_constant"))
"""

from __future__ import annotations

from .models import FC, MODELS, Builder, ConvNet, ResNet, build_model
from .recipe import EdgePopupRecipe
from .trainer import make_model, make_optimizer, train_edgepopup

__all__ = [
    "FC",
    "MODELS",
    "Builder",
    "ConvNet",
    "EdgePopupRecipe",
    "ResNet",
    "build_model",
    "make_model",
    "make_optimizer",
    "train_edgepopup",
]
