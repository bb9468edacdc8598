"""``train_str``: build the data, model and optimiser of an ``STRRecipe`` and train it.

The model is the edge-popup package's architecture built densely (Kaiming-normal fan-in init,
learned BatchNorm, no biases, as the official STR ``Builder``) and then converted with
``subkern.sparsify_(model, STRConfig(...))``: every Linear / Conv2d becomes an STR layer with the
threshold ``s`` (first / last layer optionally dense). The optimiser is SGD with three parameter
groups, as the official ``get_optimizer``: BatchNorm parameters (decay unless ``bn_decay=False``),
the thresholds ``s`` (``threshold_decay``, default the weight decay; the group is named
``"thresholds"`` so ``TargetSparsity`` can steer it) and everything else.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import nn

from ... import data as data_mod
from ...training import DistInfo, evaluate, fit, process_group, seed_everything
from ..edgepopup.models import Builder, build_model
from .budget import budget_report
from .recipe import STRRecipe
from .target import THRESHOLD_GROUP, TargetSparsity, model_sparsity, str_layers

CHECKPOINT_NAME = "checkpoint.pt"
RESULT_NAME = "result.json"
BUDGET_NAME = "budget.png"

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def make_model(recipe: STRRecipe, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The recipe's network: dense (``dense_baseline``) or with STR layers."""
    builder = Builder(subnet=False, init="kaiming_normal", bn="affine")
    model = build_model(recipe.model, builder, in_shape, num_classes, recipe.width_mult)
    if recipe.dense_baseline:
        return model
    from ...sparsify import STRConfig, sparsify_

    config = STRConfig(s_init=recipe.s_init_value, per_channel=recipe.per_channel,
                       skip_first=recipe.first_layer_dense, skip_last=recipe.last_layer_dense)
    return sparsify_(model, config)


def make_optimizer(model: nn.Module, recipe: STRRecipe) -> torch.optim.SGD:
    """SGD with the official three groups: ``"bn"``, ``"thresholds"`` and ``"weights"``."""
    thresholds = {id(m.s) for m in str_layers(model)}
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS)
                   for p in m.parameters(recurse=False)}
    groups: dict[str, list[nn.Parameter]] = {"bn": [], THRESHOLD_GROUP: [], "weights": []}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        key = (THRESHOLD_GROUP if id(param) in thresholds else
               "bn" if id(param) in norm_params else "weights")
        groups[key].append(param)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters")
    decay = recipe.weight_decay_value
    decays = {"bn": decay if recipe.bn_decay else 0.0,
              THRESHOLD_GROUP: recipe.threshold_decay_value, "weights": decay}
    param_groups = [{"params": params, "name": name, "weight_decay": decays[name]}
                    for name, params in groups.items() if params]
    return torch.optim.SGD(param_groups, lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=decay, nesterov=recipe.nesterov)


def steps_per_epoch(num_train: int, batch_size: int, world_size: int = 1) -> int:
    """Optimiser steps per epoch of ``fit`` (``DistributedSampler`` pads to equal shards)."""
    per_rank = batch_size // world_size
    return max(1, math.ceil(math.ceil(num_train / world_size) / per_rank))


def train_str(recipe: STRRecipe, info: DistInfo | None = None,
              log: Any = print) -> dict[str, Any]:
    """Train ``recipe``; returns ``{"test_acc", "sparsity", "budget", "history", "model", ...}``.

    ``sparsity`` is the fraction of zeros in the STR layers' effective weights (``None`` for the
    dense baseline); ``budget`` is ``budget_report(model, one test image).to_json()`` (every
    Linear/Conv2d, dense ones included), ``budget_table`` its text table. When ``info`` is not
    given the process group is taken from torchrun's environment (and left again at the end).
    With ``recipe.out`` the checkpoint (every epoch), ``result.json`` and ``budget.png`` are
    written there; ``recipe.resume`` continues from a checkpoint.
    """
    with process_group(recipe.device, info) as info:
        seed_everything(recipe.seed)
        split = data_mod.load(recipe.data, recipe.data_dir, recipe.seed)
        model = make_model(recipe, split.in_shape, split.num_classes).to(info.device)
        optimizer = make_optimizer(model, recipe)
        controller = None
        if recipe.target_sparsity is not None:
            total = recipe.num_epochs * steps_per_epoch(len(split.train), recipe.batch_size,
                                                        info.world_size)
            controller = TargetSparsity(model, optimizer, recipe.target_sparsity, total,
                                        ramp=recipe.target_ramp).attach()
        checkpoint = os.path.join(recipe.out, CHECKPOINT_NAME) if recipe.out else None
        config = recipe.fit_config(recipe.warmup_epochs, checkpoint, log)
        history = fit(model, split.train, split.test, optimizer, config, info)
        if controller is not None:
            controller.detach()
        test_acc = history[-1]["test_acc"] if history else evaluate(
            model, split.test, info.device, info=info)
        sample = split.test[0][0].unsqueeze(0).to(info.device)   # any Dataset
        report = budget_report(model, sample)
        sparsity = None if recipe.dense_baseline else model_sparsity(model)
        result = {
            "method": "dense" if recipe.dense_baseline else "str",
            "recipe": recipe.to_dict(),
            "test_acc": test_acc, "sparsity": sparsity,
            "overall_sparsity": report.sparsity, "history": history,
            "thresholds": [float(torch.sigmoid(m.s.detach().double()).mean())
                           for m in str_layers(model)],
            "budget": report.to_json(), "budget_table": report.table(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "world_size": info.world_size, "device": str(info.device),
            "torch_threads": torch.get_num_threads(),
        }
        if recipe.out and info.is_main:
            os.makedirs(recipe.out, exist_ok=True)
            with open(os.path.join(recipe.out, RESULT_NAME), "w") as handle:
                json.dump(result, handle, indent=2)
            report.plot(os.path.join(recipe.out, BUDGET_NAME),
                        title=f"STR {recipe.model} on {recipe.data}: "
                              f"{100 * report.sparsity:.1f}% sparse, test acc {test_acc:.4f}")
        return result | {"model": model, "report": report}
