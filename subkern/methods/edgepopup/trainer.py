"""``train_edgepopup``: build the data, model and optimiser of a recipe and train it.

Only parameters with ``requires_grad`` are optimised: in a subnetwork these are the scores alone
(weights are frozen, BatchNorm is non-affine), so weight decay acts on the scores as in the
official code. The dense baseline trains every weight (and a learned BatchNorm).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from ... import data as data_mod
from ...nn.subnet import kept_fraction
from ...training import DistInfo, evaluate, fit, process_group, seed_everything
from .models import Builder, build_model
from .recipe import EdgePopupRecipe

CHECKPOINT_NAME = "checkpoint.pt"
RESULT_NAME = "result.json"


def make_model(recipe: EdgePopupRecipe, in_shape: tuple[int, int, int],
               num_classes: int) -> nn.Module:
    """The recipe's model: Subnet layers, or dense ones for ``dense_baseline`` (which uses
    kaiming-normal weights when the recipe asks for a constant init, as a normal dense net)."""
    if recipe.dense_baseline:
        init = recipe.init if recipe.init.startswith("kaiming") else "kaiming_normal"
        builder = Builder(subnet=False, init=init, bn="affine")
    else:
        builder = Builder(subnet=True, k=recipe.k, init=recipe.init, scale_fan=recipe.scale_fan,
                          bn="nonaffine", first_layer_dense=recipe.first_layer_dense,
                          last_layer_dense=recipe.last_layer_dense)
    return build_model(recipe.model, builder, in_shape, num_classes, recipe.width_mult)


def make_optimizer(model: nn.Module, recipe: EdgePopupRecipe) -> torch.optim.SGD:
    """SGD over the trainable parameters (the scores of a subnetwork)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)


def train_edgepopup(recipe: EdgePopupRecipe, info: DistInfo | None = None,
                    log: Any = print) -> dict[str, Any]:
    """Train ``recipe``; returns ``{"test_acc", "history", "kept_fraction", "model", ...}``
    (``initial_test_acc``: the accuracy before training, i.e. of the random network with its
    initial random mask; ``None`` on resume).

    When ``info`` is not given the process group is taken from torchrun's environment (and left
    again at the end). With ``recipe.out`` the checkpoint (every epoch) and ``result.json`` are
    written there; ``recipe.resume`` continues from a checkpoint.
    """
    with process_group(recipe.device, info) as info:
        seed_everything(recipe.seed)
        split = data_mod.load(recipe.data, recipe.data_dir, recipe.seed)
        model = make_model(recipe, split.in_shape, split.num_classes).to(info.device)
        optimizer = make_optimizer(model, recipe)
        checkpoint = os.path.join(recipe.out, CHECKPOINT_NAME) if recipe.out else None
        config = recipe.fit_config(recipe.warmup, checkpoint, log)
        initial_acc = None if recipe.resume else evaluate(model, split.test, info.device,
                                                           info=info)
        history = fit(model, split.train, split.test, optimizer, config, info)
        test_acc = history[-1]["test_acc"] if history else evaluate(
            model, split.test, info.device, info=info)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result = {
            "method": "dense" if recipe.dense_baseline else "edgepopup",
            "recipe": recipe.to_dict() | {"epochs": recipe.num_epochs},
            "test_acc": test_acc, "initial_test_acc": initial_acc, "history": history,
            "kept_fraction": None if recipe.dense_baseline else kept_fraction(model),
            "trainable_parameters": trainable, "world_size": info.world_size,
            "device": str(info.device), "torch_threads": torch.get_num_threads(),
        }
        if recipe.out and info.is_main:
            with open(os.path.join(recipe.out, RESULT_NAME), "w") as handle:
                json.dump(result, handle, indent=2)
        return result | {"model": model}
