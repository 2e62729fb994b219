"""The SHOT network: backbone -> Linear bottleneck -> BatchNorm1d -> weight-normed classifier."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from hdrq_lightning.models.backbones import build_backbone


class ShotNet(nn.Module):
    """Feature extractor + bottleneck + classifier as in SHOT (Liang et al., 2020).

    ``features`` returns the bottleneck features used for SHOT's clustering pseudo labels.
    """

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

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.bottleneck.parameters(), *self.bn.parameters()]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.bottleneck(self.backbone(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_shot_net(backbone: str, num_classes: int, bottleneck_dim: int = 256, pretrained: bool = False,
                   checkpoint_path: str | None = None) -> ShotNet:
    return ShotNet(build_backbone(backbone, pretrained, checkpoint_path), num_classes, bottleneck_dim)
