"""Split a network into reconstruction units: stem, every residual block, head.

The composition of the units in order equals the model's forward, which is what lets the reconstruction
engine carry block inputs forward instead of re-running the prefix for every block.
"""

from __future__ import annotations

from torch import nn

from hdrq_lightning.errors import ConfigError


def reconstruction_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, unit), ...]`` for a :class:`ShotNet` on a timm ResNet (also after folding / quantization).

    Units share their modules with ``model`` (no copies): training a unit trains the model.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None or not all(hasattr(backbone, n) for n in ("conv1", "layer1", "layer4", "global_pool")):
        raise ConfigError(
            f"block reconstruction supports a SHOT network on a timm ResNet backbone; got "
            f"{type(model).__name__} with backbone {type(backbone).__name__}. Add a reconstruction_blocks() "
            "method to the model to define its units."
        )
    stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool)
    units: list[tuple[str, nn.Module]] = [("stem", stem)]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(backbone, stage)):
            units.append((f"{stage}.{index}", block))
    head = nn.Sequential(backbone.global_pool, backbone.fc, model.bottleneck, model.bn, model.classifier)
    units.append(("head", head))
    return units
