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

from contextlib import contextmanager

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.resnet import BasicBlock, ResNet
from torch import Tensor, nn

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.models.backbones import load_backbone_weights
from hdrq_lightning.quant.facts import QuantFacts


class ResNetEncoder(nn.Module):
    """The four stages of a timm ResNet (``output_stride`` 8: dilated layer3/layer4) as feature levels."""

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.model = resnet
        self.out_channels = [resnet.feature_info[i]["num_chs"] for i in range(1, 5)]
        self.checkpointing = False  # activation checkpointing of the residual blocks while training (a runtime option)

    def stem(self, x: Tensor) -> Tensor:
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def forward(self, x: Tensor) -> list[Tensor]:
        m, levels = self.model, []
        x = self.stem(x)
        recompute = self.checkpointing and torch.is_grad_enabled()
        for stage in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = checkpointed(stage, x) if recompute else stage(x)
            levels.append(x)
        return levels


@contextmanager
def frozen_batch_norm_statistics(module: nn.Module):
    """BatchNorm layers of ``module`` normalise as they are (batch statistics in training) without updating their
    running statistics or counters: the recomputation of a checkpointed forward must not count a batch twice."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def checkpointed(stage: nn.Sequential, x: Tensor) -> Tensor:
    """``stage`` block by block with activation checkpointing (only each block's input is kept; the block runs
    again in the backward pass, with the same random state and its BatchNorm statistics frozen)."""
    for block in stage:
        calls = [0]

        def run(inputs: Tensor, block: nn.Module = block, calls: list[int] = calls) -> Tensor:
            calls[0] += 1
            if calls[0] == 1:
                return block(inputs)
            with frozen_batch_norm_statistics(block):
                return block(inputs)

        x = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
    return x


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

    def calibration_forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Both heads on one single-scale pass: what calibration and the unit capture run (HRDA's context pass
        when ``x`` is the crop at the context scale)."""
        levels = self.features(x)
        logits = self.decode(levels)
        return (logits,) if self.attention_head is None else (logits, self.attention(levels))

    def _stem_modules(self) -> list[nn.Module]:
        m = self.encoder.model
        deep = isinstance(m.conv1, nn.Sequential)
        return [*(m.conv1 if deep else [m.conv1]), m.bn1, m.act1]

    def reconstruction_units(self, granularity: str = "layer") -> list[tuple[str, nn.Module]]:
        """Units in call order (the capture walker serves them: the heads read four encoder levels).

        ``layer`` (the official HDRQ split, 48 units for the R101 network): the stem's convs one unit each
        (a deep stem's three conv + BN + ReLU; the max-pool belongs to no unit), every residual block, and per
        head each embedding, the fuse conv and the classifier. ``block``: one stem unit, the residual blocks,
        and each head as one unit reading the four levels."""
        m = self.encoder.model
        stem = self._stem_modules()
        if granularity == "layer" and isinstance(m.conv1, nn.Sequential):
            convs = [i for i, module in enumerate(stem)  # Conv2d or its quantized swap
                     if isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 4]
            bounds = [*convs, len(stem)]
            units = [(f"stem.{k}", nn.Sequential(*stem[bounds[k]:bounds[k + 1]])) for k in range(len(convs))]
        else:
            units = [("stem", nn.Sequential(*stem))]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            units += [(f"{stage}.{index}", block) for index, block in enumerate(getattr(m, stage))]
        heads = [("head", self.head)] + ([] if self.attention_head is None else [("attention", self.attention_head)])
        for name, head in heads:
            if granularity == "block":
                units.append((name, head))
                continue
            units += [(f"{name}.embed.{i}", linear) for i, linear in enumerate(head.embed)]
            units += [(f"{name}.fuse", head.fuse), (f"{name}.classifier", head.classifier)]
        return units

    def quant_facts(self) -> QuantFacts:
        """As the official HDRQ segmentation code: 8-bit weights on the first stem conv and both classifiers, 8-bit
        inputs to both classifiers (the fuse ReLUs' outputs), the linear embeddings' outputs quantized with a
        symmetric quantizer (no ReLU follows them), the classifiers' outputs unquantized."""
        first = "encoder.model.conv1.0" if isinstance(self.encoder.model.conv1, nn.Sequential) \
            else "encoder.model.conv1"
        heads = ["head"] + ([] if self.attention_head is None else ["attention_head"])
        embeds = tuple(f"{h}.embed.*" for h in heads)
        return QuantFacts(eight_bit_weights=(first, *(f"{h}.classifier" for h in heads)),
                          eight_bit_outputs=tuple(f"{h}.fuse.2" for h in heads),
                          output_quantized=embeds, symmetric_outputs=embeds)


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
