"""Learning-rate schedule of the reconstruction engine: per unit, linear warmup then cosine annealing.

Each optimizer param group carries ``initial_lr`` and ``schedule`` (constant | cosine | warmup_cosine); before
every step the callback sets ``lr`` of the groups trained in the current phase from the engine's iteration within
the unit, so the schedule is a pure function of (iteration, unit length) and resumes exactly.
"""

from __future__ import annotations

import math
from typing import Any

from hdrq_lightning.callbacks.engine import EngineCallback
from hdrq_lightning.quant.hooks import Engine


def warmup_cosine_factor(iteration: int, total: int, warmup_fraction: float) -> float:
    """Multiplier of the base lr: linear from 1/warmup to 1 over the warmup, then cosine down to 0 at ``total``.

    Matches ``SequentialLR([LinearLR(start_factor=1/warmup, total_iters=warmup), CosineAnnealingLR(T_max=total -
    warmup)], milestones=[warmup])``.
    """
    warmup = int(round(warmup_fraction * total))
    if warmup > 0 and iteration < warmup:
        return 1.0 / warmup + (1.0 - 1.0 / warmup) * iteration / warmup
    return cosine_factor(iteration - warmup, total - warmup)


def cosine_factor(iteration: int, total: int) -> float:
    if total <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / total))


def schedule_factor(schedule: str, iteration: int, total: int, warmup_fraction: float) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return cosine_factor(iteration, total)
    return warmup_cosine_factor(iteration, total, warmup_fraction)


class LearningRateSchedule(EngineCallback):
    """Sets each param group's lr from its ``schedule`` (constant | cosine | warmup_cosine) before every
    reconstruction step (an engine step hook)."""

    def __init__(self, warmup_fraction: float = 0.2) -> None:
        self.warmup_fraction = warmup_fraction

    def attach(self, engine: Engine) -> None:
        """Run before every engine iteration (also when the engine is driven without a Trainer)."""
        engine.step_hooks["lr"] = self.before_step

    def before_step(self, engine: Engine) -> None:
        phase = engine.phase
        iteration, total = engine.phase_iteration, phase.iters
        for group in engine.active_groups(phase):
            engine.set_lr(group, group["initial_lr"] * schedule_factor(
                group.get("schedule", "constant"), iteration, total, self.warmup_fraction))

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_fraction": self.warmup_fraction}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warmup_fraction = state_dict["warmup_fraction"]
