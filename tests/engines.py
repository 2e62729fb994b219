"""Engines on the tiny ResNet shared by the engine tests (driven without a Trainer)."""

from __future__ import annotations

import torch

from hdrq_lightning.callbacks import CosineWarmup, NoiseToFakeQuantSwitch
from hdrq_lightning.models.shot import build_shot_net
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import quantize_model
from hdrq_lightning.quant.recipe import Recipe, Runtime
from hdrq_lightning.quant.reconstruction import ReconstructionModule
from hdrq_lightning.stages.quantize import quant_config


def tiny_model_and_calibration() -> tuple[torch.nn.Module, torch.Tensor]:
    """A BN-folded random resnet_tiny (seed 0) and 16 random 32 px calibration images."""
    torch.manual_seed(0)
    fp = fold_batch_norm(build_shot_net("resnet_tiny", 10).eval())
    return fp, torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def started_engine(fp: torch.nn.Module, calibration: torch.Tensor, recipe: Recipe, runtime: Runtime,
                   device: str = "cpu") -> ReconstructionModule:
    """A freshly quantized engine on ``device`` with the lr-schedule and noise-switch hooks, at its first step."""
    module = ReconstructionModule(fp, quantize_model(fp, quant_config(recipe)), calibration, recipe,
                                  runtime=runtime).to(device)
    CosineWarmup(recipe.warmup_fraction).attach(module)
    NoiseToFakeQuantSwitch(recipe.noise).attach(module)
    module.start()
    return module
