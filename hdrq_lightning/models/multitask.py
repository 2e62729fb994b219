"""One vision-transformer encoder, one linear head per task: the task-arithmetic setting (CLIP ViT-B/32 and its
fine-tuned encoders, each task with its own classification head), as a model plug-in.

``MultiTaskNet`` holds a timm ``VisionTransformer`` without classifier (``encoder``) and ``heads[<task>]``;
``select_task(task)`` chooses the head ``forward`` uses (the evaluators call it per task). For quantization the
encoder is a chain of units: the embedding (patch projection, class token and position embedding), each block,
and the final norm with pooling; their composition is ``forward_head(forward_features(x), pre_logits=True)``
(tested). The heads are task-specific and stay in float (``quant_facts().skip``); the patch projection keeps 8-bit
weights, as a first layer. Merging sees identical heads in every model (``assemble``), so every merge keeps them.

``models_from_files`` reads a base and one expert per task from local files (safetensors or a torch state dict:
``.pt``, ``.pth``, ``.bin``), either in this network's layout (``encoder.*``, ``heads.<task>.*``) or as a bare timm
encoder (its keys are then put under ``encoder.``; a timm ``head.*`` is dropped); each task's head comes from its
expert file or from a separate heads file (``heads.<task>.*`` or ``<task>.*``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from hdrq_lightning.errors import ArtifactError, ConfigError
from hdrq_lightning.quant.facts import QuantFacts


class _Embed(nn.Module):
    """The encoder's first unit: patch projection, class token and position embedding, pre-norm."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed, self.patch_drop, self.norm_pre = vit.patch_embed, vit.patch_drop, vit.norm_pre
        self._vit = [vit]  # not a child: the unit shares the network's modules, it does not own the tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.patch_drop(self._vit[0]._pos_embed(self.patch_embed(x))))


class _Pool(nn.Module):
    """The encoder's last unit: final norm, pooling (class token, mean or attention pooling) and its norm."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.norm, self.fc_norm = vit.norm, vit.fc_norm
        if getattr(vit, "attn_pool", None) is not None:
            self.attn_pool = vit.attn_pool
        self._vit = [vit]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._vit[0].forward_head(self.norm(x), pre_logits=True)


class MultiTaskNet(nn.Module):
    reconstruction_chain = True  # the encoder's units compose to the features; the heads are not quantized

    def __init__(self, encoder: nn.Module, num_classes: Mapping[str, int]) -> None:
        super().__init__()
        if not hasattr(encoder, "blocks") or not hasattr(encoder, "_pos_embed"):
            raise ConfigError(f"model.backbone builds a {type(encoder).__name__}; the multi-task network takes a "
                              "timm VisionTransformer (e.g. vit_base_patch32_clip_224).")
        if not num_classes:
            raise ConfigError("the multi-task network needs at least one task (data.targets).")
        self.encoder = encoder
        self.heads = nn.ModuleDict({task: nn.Linear(encoder.num_features, int(count))
                                    for task, count in num_classes.items()})
        self.task = next(iter(num_classes))

    def select_task(self, task: str) -> None:
        if task not in self.heads:
            raise ConfigError(f"task {task!r} has no head; the network has {', '.join(self.heads)}.")
        self.task = task

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[self.task](self.features(x))

    def reconstruction_units(self) -> list[tuple[str, nn.Module]]:
        encoder = self.encoder
        return [("encoder.embed", _Embed(encoder)),
                *((f"encoder.blocks.{i}", block) for i, block in enumerate(encoder.blocks)),
                ("encoder.pool", _Pool(encoder))]

    def quant_facts(self) -> QuantFacts:
        return QuantFacts(eight_bit_weights=("encoder.patch_embed.proj",), skip=("heads",))


def build_multitask_vit(backbone: str, num_classes: Mapping[str, int], backbone_args: Mapping[str, Any] | None = None,
                        pretrained: bool = False, checkpoint_path: str | None = None) -> MultiTaskNet:
    """A ``MultiTaskNet`` on ``timm.create_model(backbone, num_classes=0, **backbone_args)`` with random weights
    (``pretrained`` must stay false: nothing is downloaded; ``checkpoint_path``: a local encoder file)."""
    if pretrained:
        raise ConfigError("model.pretrained=true would download weights; give a local file in "
                          "model.checkpoint_path (or the base model in pmq.models.base) instead.")
    if not isinstance(num_classes, Mapping):
        raise ConfigError(f"the multi-task network needs num_classes per task (a mapping), got {num_classes!r}; "
                          "use it with data=task_folders or data=builtin_tasks.")
    try:
        encoder = timm.create_model(backbone, pretrained=False, num_classes=0, **dict(backbone_args or {}))
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"model.backbone={backbone!r} with {dict(backbone_args or {})} does not build: {err}") \
            from None
    model = MultiTaskNet(encoder, num_classes)
    if checkpoint_path:
        load_into(model, read_state(Path(checkpoint_path)), Path(checkpoint_path), heads_required=False)
    return model


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``weights_only``: no code runs); ``{"state_dict": ...}`` and
    ``{"model": ...}`` wrappers are unwrapped."""
    if not path.is_file():
        raise ArtifactError(f"model file {str(path)!r} does not exist; give the path of a local weight file.")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise ArtifactError(f"model file {str(path)!r} cannot be read as safetensors or a torch state dict "
                            f"({type(err).__name__}: {err}).") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"model file {str(path)!r} holds no state dict of tensors.")
    return state


def _in_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in the network's layout: a bare timm encoder's keys go under ``encoder.`` (its ``head.*`` and the
    ``module.`` prefix of a DataParallel save are dropped)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith(("encoder.", "heads.")) for k in state):
        return dict(state)
    return {f"encoder.{k}": v for k, v in state.items() if not k.startswith("head.")}


def load_into(model: MultiTaskNet, state: Mapping[str, torch.Tensor], path: Path, heads_required: bool) -> None:
    """Load ``state`` (either layout) into ``model``: every encoder key must match; heads where present (all of
    them when ``heads_required``)."""
    state = _in_layout(state)
    own = model.state_dict()
    encoder_keys = {k for k in own if k.startswith("encoder.")}
    missing = sorted(encoder_keys - set(state))
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        raise ArtifactError(
            f"model file {str(path)!r} does not fit the network of model.backbone "
            f"({len(missing)} encoder keys missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. "
            f"{unexpected[:3]}; {len(wrong)} of another shape, e.g. {wrong[:3]}). Check model.backbone and "
            "model.backbone_args against the file.")
    if heads_required:
        absent = sorted(k for k in own if k.startswith("heads.") and k not in state)
        if absent:
            raise ArtifactError(f"model file {str(path)!r} lacks the heads {absent[:4]}.")
    model.load_state_dict({**own, **state})


def models_from_files(model: MultiTaskNet, base: str, experts: Mapping[str, str], heads: str | None
                      ) -> tuple[MultiTaskNet, list[MultiTaskNet]]:
    """(base, [expert per task in the network's task order]) with the same heads in every model: task t's head
    from ``heads`` when given, else from expert t's file. ``model`` is a freshly built network (its architecture)."""
    tasks = list(model.heads)
    absent = [t for t in tasks if t not in experts]
    extra = [t for t in experts if t not in tasks]
    if absent or extra:
        raise ConfigError(f"pmq.models.experts must name one file per task of data.targets ({', '.join(tasks)}); "
                          f"missing: {absent or 'none'}, not a task: {extra or 'none'}.")
    head_state: dict[str, torch.Tensor] = {}
    if heads:
        shared = read_state(Path(heads))
        shared = {k if k.startswith("heads.") else f"heads.{k}": v for k, v in shared.items()}
        head_state = {k: v for k, v in shared.items() if k.split(".")[1] in tasks}
    loaded = []
    for task in tasks:
        path = Path(experts[task])
        state = _in_layout(read_state(path))
        if not heads:
            own = {k: v for k, v in state.items() if k.startswith(f"heads.{task}.")}
            if not own:
                raise ArtifactError(f"expert file {str(path)!r} of task {task!r} has no heads.{task}.* weights; "
                                    "give the heads in pmq.models.heads.")
            head_state.update(own)
        loaded.append((path, {k: v for k, v in state.items() if not k.startswith("heads.")}))
    absent = sorted({k for k in model.state_dict() if k.startswith("heads.")} - set(head_state))
    if absent:
        raise ArtifactError(f"no weights for the heads {absent[:4]} in {heads or 'the expert files'}.")

    def assembled(path: Path, encoder_state: Mapping[str, torch.Tensor]) -> MultiTaskNet:
        network = copy.deepcopy(model)
        load_into(network, {**encoder_state, **head_state}, path, heads_required=True)
        return network.eval()

    base_path = Path(base)
    base_state = {k: v for k, v in _in_layout(read_state(base_path)).items() if not k.startswith("heads.")}
    return assembled(base_path, base_state), [assembled(path, state) for path, state in loaded]
