"""SHOT's optimiser and learning-rate decay, shared by source training and adaptation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def shot_optimizer(param_groups: Iterable[tuple[Iterable[nn.Parameter], float]], lr: float, momentum: float,
                   weight_decay: float, nesterov: bool) -> torch.optim.SGD:
    """SGD over (parameters, lr multiplier) groups; ``initial_lr`` is what the decay scales."""
    groups = [{"params": [p for p in params if p.requires_grad], "lr": lr * mult, "initial_lr": lr * mult}
              for params, mult in param_groups]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def shot_lr_decay(optimizer: torch.optim.Optimizer, total_steps: int, gamma: float = 10.0,
                  power: float = 0.75) -> torch.optim.lr_scheduler.LambdaLR:
    """lr = lr0 * (1 + gamma * p) ** -power with p = step / total_steps (SHOT's schedule)."""
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1.0 + gamma * min(step, total) / total) ** (-power))
