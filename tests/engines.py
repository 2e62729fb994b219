"""Engines on the tiny ResNet shared by the engine tests (driven without a Trainer)."""

from __future__ import annotations

import torch
from timm.models.resnet import BasicBlock, ResNet

from hdrq_lightning.callbacks import DistanceRegularizer, LearningRateSchedule, NoiseToFakeQuantSwitch
from hdrq_lightning.models.shot import ShotNet, build_shot_net
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import quantize_model
from hdrq_lightning.quant.recipe import NoiseRecipe, Recipe, Runtime, WeightRecipe
from hdrq_lightning.quant.reconstruction import ReconstructionModule


def tiny_model_and_calibration() -> tuple[torch.nn.Module, torch.Tensor]:
    """A BN-folded random resnet_tiny (seed 0) and 16 random 32 px calibration images."""
    torch.manual_seed(0)
    fp = fold_batch_norm(build_shot_net("resnet_tiny", 10).eval())
    return fp, torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def three_block_stage_net() -> ShotNet:
    """A SHOT net on a narrow timm ResNet whose layer1 has three BasicBlocks (64 -> 16 channels, then 16 -> 16
    twice: layer1.1 and layer1.2 have the same shapes), random weights (seed 0), before BN folding."""
    torch.manual_seed(0)
    # zero_init_last=False: timm zero-inits every block's last BN scale, which would make the blocks identities
    # (their losses then cannot tell one block's weights from another's)
    backbone = ResNet(block=BasicBlock, layers=(3, 1, 1, 1), channels=(16, 32, 64, 128), num_classes=0,
                      zero_init_last=False)
    return ShotNet(backbone, 10, 32).eval()


def three_block_stage_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """``three_block_stage_net`` BN-folded, and 16 random 32 px calibration images."""
    return fold_batch_norm(three_block_stage_net()), torch.randn(16, 3, 32, 32)


# the architecture config of three_block_stage_net (what the compile-ahead worker rebuilds)
THREE_BLOCK_STAGE_CONFIG = {"_target_": "engines.three_block_stage_net"}


def started_engine(fp: torch.nn.Module, calibration: torch.Tensor, recipe: Recipe, runtime: Runtime,
                   device: str = "cpu", world: tuple[int, int] = (1, 0)) -> ReconstructionModule:
    """A freshly quantized engine on ``device`` with the lr-schedule and noise-switch hooks, at its first step."""
    module = ReconstructionModule(fp, quantize_model(fp, recipe.numerics()), calibration, recipe,
                                  runtime=runtime).to(device)
    module.standalone_world = world
    LearningRateSchedule(recipe.warmup_fraction).attach(module)
    NoiseToFakeQuantSwitch(recipe.noise).attach(module)
    module.start()
    return module


def hdrq_engine_with_distance(runtime: Runtime, iters: int = 6, world: tuple[int, int] = (1, 0)
                              ) -> ReconstructionModule:
    """HDRQ (noise switch at 5 of 6 iterations, distance regulariser on) on ``three_block_stage_model``, as rank
    ``world[1]`` of ``world[0]`` (without a Trainer: its slice of the global batch)."""
    recipe = Recipe(method="hdrq", iters=iters, batch_size=8, distance_weight=5e-2, noise=NoiseRecipe(enabled=True),
                    weight=WeightRecipe(rounding="latent", symmetric=True, learn_scale=True, lr=1e-4,
                                        schedule="warmup_cosine"))
    fp, calibration = three_block_stage_model()
    engine = started_engine(fp, calibration, recipe, runtime, world=world)
    DistanceRegularizer(fp.state_dict(), recipe.distance_weight).attach(engine)
    return engine
