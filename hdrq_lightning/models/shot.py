"""The SHOT network: backbone -> Linear bottleneck -> BatchNorm1d -> weight-normed classifier."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.models.backbones import build_backbone
from hdrq_lightning.quant.facts import QuantFacts


class ShotNet(nn.Module):
    """Feature extractor + bottleneck + classifier as in SHOT (Liang et al., 2020).

    ``features`` returns the bottleneck features used for SHOT's clustering pseudo labels.
    """

    reconstruction_chain = True  # stem, blocks and head compose to the forward (quant/facts.py)

    def __init__(self, backbone: nn.Module, num_classes: int, bottleneck_dim: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        feature_dim = backbone.num_features
        self.bottleneck = nn.Linear(feature_dim, bottleneck_dim)
        self.bn = nn.BatchNorm1d(bottleneck_dim)
        self.classifier = weight_norm(nn.Linear(bottleneck_dim, num_classes), name="weight")
        self._init_head()

    def _init_head(self) -> None:
        # SHOT: Xavier normal for Linear layers, BN weight ~ N(1, 0.02), zero biases.
        nn.init.xavier_normal_(self.bottleneck.weight)
        nn.init.zeros_(self.bottleneck.bias)
        nn.init.normal_(self.bn.weight, 1.0, 0.02)
        nn.init.zeros_(self.bn.bias)
        with torch.no_grad():
            weight = torch.empty_like(self.classifier.weight)
            nn.init.xavier_normal_(weight)
            self.classifier.weight = weight  # through the parametrization: sets g and v
            nn.init.zeros_(self.classifier.bias)

    def quant_facts(self) -> QuantFacts:
        """8-bit weights on the first conv and the classifier, 8-bit input to the classifier (the bottleneck's
        output, quantized since no ReLU follows it), as in BRECQ / QDrop / HDRQ."""
        return QuantFacts(eight_bit_weights=("backbone.conv1", "classifier"), eight_bit_outputs=("bottleneck",),
                          output_quantized=("bottleneck",))

    def reconstruction_units(self) -> list[tuple[str, nn.Module]]:
        """Stem, every residual block of the timm ResNet, head: a chain whose composition is the forward (also
        after BN folding and quantization; the units share their modules with the model)."""
        backbone = self.backbone
        if not all(hasattr(backbone, n) for n in ("conv1", "bn1", "act1", "maxpool", "layer4", "global_pool")):
            raise ConfigError(f"ShotNet's reconstruction units need a timm ResNet backbone, got "
                              f"{type(backbone).__name__}.")
        units: list[tuple[str, nn.Module]] = [
            ("stem", nn.Sequential(backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool))]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            units += [(f"{stage}.{index}", block) for index, block in enumerate(getattr(backbone, stage))]
        units.append(("head", nn.Sequential(backbone.global_pool, backbone.fc, self.bottleneck, self.bn,
                                            self.classifier)))
        return units

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.bottleneck.parameters(), *self.bn.parameters()]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.bottleneck(self.backbone(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_shot_net(backbone: str, num_classes: int, bottleneck_dim: int = 256, pretrained: bool = False,
                   checkpoint_path: str | None = None) -> ShotNet:
    return ShotNet(build_backbone(backbone, pretrained, checkpoint_path), num_classes, bottleneck_dim)
