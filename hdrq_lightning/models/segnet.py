"""The segmentation network of the HDRQ experts: a dilated ResNet (output stride 8) and DAFormer's all-MLP head.

As the official HDRQ code trains it (``configs/_base_/models/segformer_r101.py``, design note segmentation.md
1.1): a ResNet-V1c encoder with contracted dilations (timm's ``resnet101c`` with ``output_stride=8`` is the same
network), four levels (strides 4, 8, 8, 8); per level a *linear* embedding of the tokens to ``embed_dim`` (786 in
the official checkpoints), bilinear upsampling (``align_corners=False``) to the first level, concatenation,
a 1x1 conv + BN + ReLU to ``fuse_dim`` (128), dropout 0.1 and a 1x1 classifier. HRDA's scale attention is a
second head of the same kind (embed and fuse 256) whose class-wise output goes through a sigmoid.

``SegNet.forward(x)`` gives logits at 1/4 of the input; ``features(x)`` the four levels; ``attention(features)`` the
attention logits. Multi-resolution training and inference (context and detail crops, fusion, slides) are
functions over a SegNet in ``models/hrda.py``, so a quantized copy of the network reuses them unchanged.
Nothing is downloaded: ImageNet weights come from ``checkpoint_path`` (a timm state dict), as for the SHOT net.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, ResNet
from torch import Tensor, nn

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.models.backbones import load_backbone_weights


class ResNetEncoder(nn.Module):
    """The four stages of a timm ResNet (``output_stride`` 8: dilated layer3/layer4) as feature levels."""

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.model = resnet
        self.out_channels = [resnet.feature_info[i]["num_chs"] for i in range(1, 5)]

    def stem(self, x: Tensor) -> Tensor:
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def forward(self, x: Tensor) -> list[Tensor]:
        m, levels = self.model, []
        x = self.stem(x)
        for stage in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = stage(x)
            levels.append(x)
        return levels


def build_encoder(backbone: str, output_stride: int = 8, pretrained: bool = False,
                  checkpoint_path: str | None = None) -> ResNetEncoder:
    if backbone == "resnet_tiny":
        resnet = ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), num_classes=0,
                        output_stride=output_stride)
    elif timm.is_model(backbone) and backbone.startswith("resnet"):
        resnet = timm.create_model(backbone, pretrained=False, num_classes=0, output_stride=output_stride)
    else:
        raise ConfigError(f"segmentation backbone {backbone!r} is not a timm ResNet; use resnet101c (the paper's), "
                          "another timm resnet*, or resnet_tiny (the built-in benchmark's).")
    if pretrained or checkpoint_path:
        if not checkpoint_path:
            raise ConfigError("model.pretrained=true needs model.checkpoint_path: a local timm weight file (e.g. "
                              "resnet101c.gluon_in1k); nothing is downloaded at run time.")
        load_backbone_weights(resnet, checkpoint_path)
    return ResNetEncoder(resnet)


class MlpHead(nn.Module):
    """DAFormer's all-MLP decoder: per level Linear(c_i, E) on tokens, upsample to level 1, concat, 1x1 conv
    (no bias) + BN + ReLU to C, dropout, 1x1 classifier to K."""

    def __init__(self, in_channels: list[int], embed_dim: int, fuse_dim: int, num_outputs: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(c, embed_dim) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(len(in_channels) * embed_dim, fuse_dim, 1, bias=False),
                                  nn.BatchNorm2d(fuse_dim), nn.ReLU())
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(fuse_dim, num_outputs, 1)

    def forward(self, levels: list[Tensor]) -> Tensor:
        size = levels[0].shape[-2:]
        embedded = []
        for linear, level in zip(self.embed, levels):
            n, _, h, w = level.shape
            tokens = linear(level.flatten(2).transpose(1, 2))  # [N, h*w, E]
            grid = tokens.transpose(1, 2).reshape(n, -1, h, w)
            if grid.shape[-2:] != size:
                grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
            embedded.append(grid)
        return self.classifier(self.dropout(self.fuse(torch.cat(embedded, 1))))


class SegNet(nn.Module):
    """Encoder + MLP head (+ HRDA's class-wise scale-attention head when ``attention_dim`` is set)."""

    def __init__(self, encoder: ResNetEncoder, num_classes: int, embed_dim: int = 786, fuse_dim: int = 128,
                 attention_dim: int | None = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder, self.num_classes = encoder, num_classes
        self.head = MlpHead(encoder.out_channels, embed_dim, fuse_dim, num_classes, dropout)
        self.attention_head = (None if attention_dim is None else
                               MlpHead(encoder.out_channels, attention_dim, attention_dim, num_classes, dropout))

    def features(self, x: Tensor) -> list[Tensor]:
        return self.encoder(x)

    def decode(self, levels: list[Tensor]) -> Tensor:
        return self.head(levels)

    def attention(self, levels: list[Tensor]) -> Tensor:
        if self.attention_head is None:
            raise ConfigError("this SegNet has no scale-attention head (model.attention_dim=null); multi-resolution "
                              "fusion needs one.")
        return self.attention_head(levels)

    def forward(self, x: Tensor) -> Tensor:
        """Single-scale logits at 1/4 of the input resolution."""
        return self.decode(self.features(x))

    def reconstruction_units(self) -> list[tuple[str, nn.Module]]:
        raise ConfigError("quantizing the segmentation network (block reconstruction, post-merge quantization) is not "
                          "available yet: its head reads four encoder levels, and the engine's unit walker serves "
                          "chains only. Segmentation experts can be trained (hdrq source / adapt) and evaluated.")


def build_segnet(backbone: str, num_classes: int, embed_dim: int = 786, fuse_dim: int = 128,
                 attention_dim: int | None = 256, dropout: float = 0.1, output_stride: int = 8,
                 pretrained: bool = False, checkpoint_path: str | None = None) -> SegNet:
    encoder = build_encoder(backbone, output_stride, pretrained, checkpoint_path)
    return SegNet(encoder, num_classes, embed_dim, fuse_dim, attention_dim, dropout)


# The official HDRQ / HRDA checkpoints (mmcv): student keys under "model." (or none), their SegNet names.
_MMCV_STEM = {"0": "conv1.0", "1": "conv1.1", "3": "conv1.3", "4": "conv1.4", "6": "conv1.6", "7": "bn1"}
_MMCV_IGNORED = ("ema_model.", "imnet_model.")


def mmcv_key(key: str) -> str | None:
    """The SegNet key of an mmcv (mmseg HRDA) state-dict key, None for keys that are not the student's."""
    if key.startswith(_MMCV_IGNORED):
        return None
    key = key.removeprefix("model.")
    if key.startswith("backbone.stem."):
        index, rest = key.removeprefix("backbone.stem.").split(".", 1)
        if index not in _MMCV_STEM:
            raise ConfigError(f"unexpected mmcv stem key {key!r} (a ResNetV1c deep stem has convs 0/3/6, BNs 1/4/7)")
        return f"encoder.model.{_MMCV_STEM[index]}.{rest}"
    if key.startswith("backbone."):
        return "encoder.model." + key.removeprefix("backbone.")
    for prefix, target in (("decode_head.head.", "head."), ("decode_head.scale_attention.", "attention_head.")):
        if key.startswith(prefix):
            rest = key.removeprefix(prefix)
            if rest.startswith("embed_layers."):
                index, tail = rest.removeprefix("embed_layers.").split(".", 1)
                return f"{target}embed.{index}.{tail.removeprefix('proj.')}"
            if rest.startswith("fuse_layer."):
                part, tail = rest.removeprefix("fuse_layer.").split(".", 1)
                return f"{target}fuse.{'0' if part == 'conv' else '1'}.{tail}"
            if rest.startswith("conv_seg."):
                return f"{target}classifier.{rest.removeprefix('conv_seg.')}"
    raise ConfigError(f"mmcv key {key!r} has no SegNet counterpart; is this an HRDA/DAFormer ResNet checkpoint "
                      "(decode_head = HRDAHead over DAFormerHead with mlp embeddings)?")


def import_mmcv_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official mmcv checkpoint's ``state_dict`` (the student's weights) as SegNet keys."""
    state = state.get("state_dict", state)
    out = {}
    for key, value in state.items():
        name = mmcv_key(key)
        if name is not None:
            out[name] = value
    return out
