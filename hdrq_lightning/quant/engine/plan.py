"""The plan of a reconstruction: every unit in every pass of the recipe, as ranges of global iterations."""

from __future__ import annotations

from dataclasses import dataclass

from hdrq_lightning.quant.recipe import Recipe


@dataclass(frozen=True)
class Phase:
    """One unit trained in one pass: global iterations [start, start + iters)."""

    pass_name: str
    unit: int
    iters: int
    start: int


def build_plan(recipe: Recipe, num_units: int) -> list[Phase]:
    plan, start = [], 0
    for pass_name in recipe.passes:
        for unit in range(num_units):
            iters = recipe.phase_iters(pass_name)
            plan.append(Phase(pass_name, unit, iters, start))
            start += iters
    return plan


def trains_weights(pass_name: str) -> bool:
    return pass_name in ("joint", "weights")


def trains_activations(pass_name: str) -> bool:
    return pass_name in ("joint", "activations")
