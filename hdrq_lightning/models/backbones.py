"""Backbone builders: timm models by name, plus the small ResNet of the built-in benchmark."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from hdrq_lightning.errors import ArtifactError, ConfigError


def resnet_tiny(**kwargs) -> ResNet:
    """A timm ResNet with one BasicBlock per stage and narrow widths (for 32x32 inputs on a CPU)."""
    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), **kwargs)


LOCAL_BACKBONES = {"resnet_tiny": resnet_tiny}


def build_backbone(name: str, pretrained: bool = False, checkpoint_path: str | None = None) -> nn.Module:
    """A feature extractor returning pooled features (``num_classes=0``); never downloads anything.

    ``pretrained=True`` needs ``checkpoint_path``: a local timm/torchvision state dict (``.pth``, ``.bin`` or
    ``.safetensors``); classifier weights in it are ignored.
    """
    if name in LOCAL_BACKBONES:
        model = LOCAL_BACKBONES[name](num_classes=0)
    else:
        if not timm.is_model(name):
            raise ConfigError(
                f"unknown backbone '{name}'; use a timm model name (e.g. resnet50, resnet101) or one of "
                f"{sorted(LOCAL_BACKBONES)}."
            )
        model = timm.create_model(name, pretrained=False, num_classes=0)
    if pretrained or checkpoint_path:
        if not checkpoint_path:
            raise ConfigError(
                "model.pretrained=true needs model.checkpoint_path pointing to a local weight file: nothing is "
                "downloaded at run time (download the timm weights once and pass their path)."
            )
        load_backbone_weights(model, checkpoint_path)
    return model


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"backbone checkpoint {path} does not exist; pass an existing local weight file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    classifier_keys = {k for k in state if k.split(".")[0] in ("fc", "head", "classifier")}
    state = {k: v for k, v in state.items() if k not in classifier_keys}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"backbone checkpoint {path} does not match the backbone: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; use weights of the same architecture as model.backbone."
        )
