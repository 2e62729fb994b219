"""Callbacks of the reconstruction engine (lr schedule, HDRQ's noise switch and distance regulariser, compile-ahead
worker, portable compile bundles) and of every stage's Trainer (progress, wall clock). ``engine_callbacks`` is the
one place that says which engine callbacks a recipe needs (the quantize stage, the benchmarks and the compile-ahead
twin use it)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hdrq_lightning.callbacks.distance import DistanceRegularizer
from hdrq_lightning.callbacks.engine import EngineCallback
from hdrq_lightning.callbacks.noise_switch import NoiseToFakeQuantSwitch
from hdrq_lightning.callbacks.schedules import LearningRateSchedule
from hdrq_lightning.quant.recipe import Recipe


def engine_callbacks(recipe: Recipe, source_weights: Mapping[str, torch.Tensor] | None = None
                     ) -> list[EngineCallback]:
    """The engine callbacks a recipe asks for: the per-group lr schedule always, HDRQ's noise switch when noise is
    on, the distance regulariser when ``distance_weight > 0`` (it needs the BN-folded source weights; without them
    it is left out, e.g. in the compile-ahead twin, which gets the engine's loss terms instead)."""
    callbacks: list[EngineCallback] = [LearningRateSchedule(recipe.warmup_fraction)]
    if recipe.noise.enabled:
        callbacks.append(NoiseToFakeQuantSwitch(recipe.noise))
    if recipe.distance_weight > 0 and source_weights is not None:
        callbacks.append(DistanceRegularizer(source_weights, recipe.distance_weight))
    return callbacks


__all__ = ["DistanceRegularizer", "EngineCallback", "LearningRateSchedule", "NoiseToFakeQuantSwitch",
           "engine_callbacks"]
