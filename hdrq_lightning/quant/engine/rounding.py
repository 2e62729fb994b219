"""Weight rounding while a unit trains (``quant.weight.rounding``), as plug-ins: the engine names no rounding.

- ``adaround`` (BRECQ, QDrop): learned rounding offsets ``alpha`` with AdaRound's regulariser, whose weight is off
  for the first ``adaround_warmup`` share of the unit and whose ``beta`` then decays linearly; hardened at the end.
- ``latent`` (HDRQ): the float weights themselves train (and the step, with ``learn_scale``), rounded to nearest.
- ``nearest``: round to nearest, nothing trained (activation steps may still train).

A plug-in says which quantizer mode the unit's weights train in, what it trains, how a finished unit's weights
are fixed, and its penalty (with the regulariser's weight and temperature per iteration, which the engine writes
into device scalars so that a captured step reads them).
"""

from __future__ import annotations

import torch
from torch import nn

from hdrq_lightning.quant.engine.plan import Phase, trains_weights
from hdrq_lightning.quant.recipe import Recipe
from hdrq_lightning.registry import Registry

ParamGroup = tuple[str, list[torch.Tensor], float, str]  # (kind, params, lr, schedule)


ROUNDINGS = Registry("weight rounding")


@ROUNDINGS.register("nearest")
class Rounding:
    """Round to nearest; nothing of the weights trains (the base of the other plug-ins)."""

    training_mode = "nearest"  # weight quantizer mode while the unit trains
    has_penalty = False

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def prepare(self, layers: list[tuple[str, nn.Module]]) -> None:
        """Once, before anything trains, with every quantized layer of the model."""

    def param_groups(self, layers: list[tuple[str, nn.Module]]) -> list[ParamGroup]:
        return []

    @torch.no_grad()
    def finish(self, layer: nn.Module) -> None:
        """Fix a finished unit's layer on its grid (the engine then stores the dequantized weight)."""
        layer.weight_quantizer.set_mode("nearest")

    def schedule(self, phase: Phase, iteration: int) -> tuple[float, float]:
        """(penalty weight, temperature) at ``iteration`` of ``phase``."""
        return 0.0, float(self.recipe.adaround_beta[0])

    def penalty(self, layers: list[nn.Module], beta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@ROUNDINGS.register("latent")
class Latent(Rounding):
    """HDRQ: the latent float weights (and, with ``learn_scale``, the weight step) train."""

    def param_groups(self, layers: list[tuple[str, nn.Module]]) -> list[ParamGroup]:
        weight = self.recipe.weight
        groups = [("weight", [layer.weight for _, layer in layers], weight.lr, weight.schedule)]
        if weight.learn_scale:
            groups.append(("weight_scale", [layer.weight_quantizer.scale for _, layer in layers], weight.scale_lr,
                           weight.schedule))
        return groups


@ROUNDINGS.register("adaround")
class AdaRound(Rounding):
    """BRECQ / QDrop: AdaRound's rounding offsets with its annealed regulariser."""

    training_mode = "adaround"
    has_penalty = True

    def prepare(self, layers: list[tuple[str, nn.Module]]) -> None:
        for _, layer in layers:
            layer.weight_quantizer.init_adaround(layer.weight.detach())

    def param_groups(self, layers: list[tuple[str, nn.Module]]) -> list[ParamGroup]:
        weight = self.recipe.weight
        return [("weight", [layer.weight_quantizer.alpha for _, layer in layers], weight.lr, weight.schedule)]

    @torch.no_grad()
    def finish(self, layer: nn.Module) -> None:
        layer.weight_quantizer.harden(layer.weight)  # fix the rounding: floor + (alpha >= 0)

    def schedule(self, phase: Phase, iteration: int) -> tuple[float, float]:
        """Off for the warmup, then beta decays linearly to its end."""
        recipe = self.recipe
        start, end = recipe.adaround_beta
        warmup = recipe.adaround_warmup * phase.iters
        if not trains_weights(phase.pass_name) or iteration < warmup:
            return 0.0, start
        progress = (iteration - warmup) / max(1.0, phase.iters - warmup)
        return recipe.adaround_reg_weight, end + (start - end) * max(0.0, 1.0 - progress)

    def penalty(self, layers: list[nn.Module], beta: torch.Tensor) -> torch.Tensor:
        return torch.stack([layer.weight_quantizer.adaround_regularizer(beta) for layer in layers]).sum()


def rounding_plugin(recipe: Recipe) -> Rounding:
    """The plug-in of ``recipe.weight.rounding``."""
    return ROUNDINGS.build(recipe.weight.rounding, recipe=recipe)
