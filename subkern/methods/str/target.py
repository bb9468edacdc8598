"""Reaching a requested overall sparsity with STR: a controller on the thresholds' weight decay.

In STR the sparsity is not set, it *emerges* from ``(s_init, weight decay)``: the decay on the
threshold parameter ``s`` pulls a very negative ``s`` towards 0, i.e. raises the threshold
``g = sigmoid(s)`` in ``W_eff = sign(W) relu(|W| - g)``, while the loss gradient
``dL/ds = -g'(s) sum(sign(W) dL/dW_eff 1[|W| > g])`` pushes back wherever pruning hurts. The
official code therefore has no way to ask for, say, 90% sparsity; one sweeps ``(s_init, wd)``.

``TargetSparsity`` closes the loop. After every optimiser step (a ``register_step_post_hook``,
so any training loop works) it measures the sparsity ``S`` of the STR layers (zeros of
``effective_weight()`` over their weights) and sets the decay of the threshold parameter group to

    target(t) = T * (1 - (1 - min(1, t / (ramp * steps)))^3)      (cubic ramp of Zhu & Gupta)
    e(t)      = target(t) - S(t)
    I(t)      = clip(I(t-1) + e(t), -I_max, I_max)                  (anti-windup)
    lambda_s  = clip(base + k_p e(t) + k_i I(t), -lambda_max, lambda_max)

so the thresholds' decay grows while the network is less sparse than the schedule asks and turns
negative (pushing ``s`` back, lowering the thresholds) when it overshoots: a proportional-integral
controller whose actuator is STR's own mechanism. The integral, the step counter and the current
decay live in the optimizer's parameter group (``"target_step"``, ``"target_integral"``), so they
are saved in the optimizer's ``state_dict`` and a resumed run continues the same control.

Limits (read before relying on it):

* The controller acts through the SGD update of ``s``, whose size is ``lr * lambda_s * |s|`` (times
  the momentum gain): with a cosine schedule its authority vanishes as the learning rate does, so
  the target must be reached before the end (``ramp`` < 1, default 0.75 of the steps) and the
  gains scale with the learning rate (defaults tuned for lr ~ 0.1, momentum 0.9).
* It steers the *overall* sparsity of the STR layers; the per-layer budget is still learned.
* ``s_init`` must not be so negative that ``|s|`` cannot reach the needed range in the steps
  given (``s`` decays at most geometrically, ``|s| * (1 - lr lambda_max)`` per step): with a
  target, start at a moderate ``s_init`` (e.g. -5).
* The decay moves ``s`` towards 0, which raises the threshold only while ``s < 0`` (thresholds
  below 0.5, always the case for STR started from a negative ``s_init`` on ordinary weight
  scales); for ``s > 0`` the direction of the correction flips.
* Sparsity is measured on this process's weights: identical on every DDP rank (same parameters),
  so ranks agree without communication.
* Expect the final sparsity within a few points of ``T``, not exactly ``T``; for an exact value
  prune the trained model to ``T`` afterwards (magnitude) and fine-tune.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

THRESHOLD_GROUP = "thresholds"


def str_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` with a learned threshold: an ``s`` parameter and
    ``effective_weight()`` (``STRLinear`` / ``STRConv2d``)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "s", None), nn.Parameter)
            and callable(getattr(m, "effective_weight", None))]


@torch.no_grad()
def model_sparsity(model: nn.Module) -> float:
    """Fraction of zeros in the effective weights of ``model``'s STR layers (0.0 if none)."""
    zeros = total = 0
    for module in str_layers(model):
        weight = module.effective_weight()
        zeros += weight.numel() - int(torch.count_nonzero(weight))
        total += weight.numel()
    return zeros / total if total else 0.0


def ramp_schedule(target: float, step: int, ramp_steps: int) -> float:
    """The cubic ramp ``T (1 - (1 - min(1, step / ramp_steps))^3)`` (``T`` from step 0 when
    ``ramp_steps`` is 0)."""
    if ramp_steps <= 0:
        return target
    progress = min(1.0, max(0.0, step / ramp_steps))
    return target * (1.0 - (1.0 - progress) ** 3)


class TargetSparsity:
    """Steer the threshold decay of ``optimizer`` so ``model`` ends near ``target`` sparsity.

    Args:
        model: the model (STR layers found by ``str_layers``).
        optimizer: its optimiser; it must have a parameter group with ``"name": "thresholds"``
            holding the ``s`` parameters (``make_optimizer`` builds it) or, failing that, the
            controller adds nothing and raises ``ValueError``.
        target: requested overall sparsity of the STR layers, ``0 <= target < 1``.
        total_steps: optimiser steps of the whole run (epochs x steps per epoch).
        ramp: fraction of ``total_steps`` over which the target ramps up (cubic).
        base_decay: decay of ``s`` before the correction (default: the group's current decay).
        kp, ki: proportional and integral gains (decay units per unit of sparsity error).
        max_decay: ``|lambda_s|`` limit; ``max_integral``: anti-windup limit of ``I``.
        every: measure and update every ``every`` steps (measuring costs one pass over the
            weights).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, target: float,
                 total_steps: int, ramp: float = 0.75, base_decay: float | None = None,
                 kp: float = 0.5, ki: float = 0.02, max_decay: float = 1.0,
                 max_integral: float = 50.0, every: int = 1) -> None:
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= ramp <= 1.0:
            raise ValueError(f"ramp must be in [0, 1], got {ramp}")
        if every < 1 or max_decay <= 0 or max_integral <= 0:
            raise ValueError("every must be >= 1, max_decay and max_integral > 0")
        if not str_layers(model):
            raise ValueError("target sparsity needs STR layers (modules with an `s` parameter "
                             "and effective_weight()); the model has none")
        groups = [g for g in optimizer.param_groups if g.get("name") == THRESHOLD_GROUP]
        if len(groups) != 1:
            raise ValueError("the optimizer needs exactly one parameter group named "
                             f"{THRESHOLD_GROUP!r} holding the thresholds s (see make_optimizer)")
        self.model = model
        self.optimizer = optimizer
        self.target = float(target)
        self.total_steps = int(total_steps)
        self.ramp_steps = int(round(ramp * total_steps))
        group = groups[0]
        self.base_decay = float(group["weight_decay"] if base_decay is None else base_decay)
        self.kp, self.ki = float(kp), float(ki)
        self.max_decay, self.max_integral = float(max_decay), float(max_integral)
        self.every = int(every)
        group.setdefault("target_step", 0)
        group.setdefault("target_integral", 0.0)
        group.setdefault("target_base_decay", self.base_decay)
        self.last_sparsity: float | None = None
        self._handle: Any = None

    @property
    def group(self) -> dict[str, Any]:
        # looked up every time: load_state_dict replaces the group dicts
        return next(g for g in self.optimizer.param_groups if g.get("name") == THRESHOLD_GROUP)

    def attach(self) -> TargetSparsity:
        """Run ``update`` after every ``optimizer.step()``; returns ``self``."""
        if self._handle is None:
            self._handle = self.optimizer.register_step_post_hook(
                lambda _opt, _args, _kwargs: self.update())
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def scheduled(self, step: int | None = None) -> float:
        """The ramped target at ``step`` (default: the current step)."""
        return ramp_schedule(self.target, self.group["target_step"] if step is None else step,
                             self.ramp_steps)

    def update(self) -> float:
        """One control step (normally called by the hook); returns the new threshold decay."""
        group = self.group
        group["target_step"] += 1
        if group["target_step"] % self.every:
            return group["weight_decay"]
        sparsity = model_sparsity(self.model)
        self.last_sparsity = sparsity
        error = self.scheduled(group["target_step"]) - sparsity
        integral = min(self.max_integral, max(-self.max_integral,
                                              group["target_integral"] + error * self.every))
        group["target_integral"] = integral
        decay = group["target_base_decay"] + self.kp * error + self.ki * integral
        group["weight_decay"] = min(self.max_decay, max(-self.max_decay, decay))
        return group["weight_decay"]
