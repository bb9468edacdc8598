"""STR reference training ("Soft Threshold Weight Reparameterization for Learnable Sparsity",
Kusupati et al., ICML 2020): the paper's recipes, a trainer, the learned per-layer budget report
and a target-sparsity controller.

    from subkern.methods.str import STRRecipe, train_str, budget_report
    result = train_str(STRRecipe(data="digits", s_init=-5.0, weight_decay=5e-3))
    print(result["report"].table())

Every Linear / Conv2d of the model becomes ``W_eff = sign(W) * relu(|W| - sigmoid(s))`` with a
learned threshold ``s`` per layer (or per output channel); the sparsity of each layer emerges
from ``(s_init, weight decay)``, or is steered towards a requested total by ``TargetSparsity``.
"""

from __future__ import annotations

from .budget import BudgetReport, LayerBudget, budget_report, sparse_layers
from .recipe import DATA_DEFAULTS, PAPER_RECIPES, STRRecipe
from .target import TargetSparsity, model_sparsity, ramp_schedule, str_layers
from .trainer import make_model, make_optimizer, steps_per_epoch, train_str

__all__ = [
    "DATA_DEFAULTS",
    "PAPER_RECIPES",
    "BudgetReport",
    "LayerBudget",
    "STRRecipe",
    "TargetSparsity",
    "budget_report",
    "make_model",
    "make_optimizer",
    "model_sparsity",
    "ramp_schedule",
    "sparse_layers",
    "steps_per_epoch",
    "str_layers",
    "train_str",
]
