"""What plugs into the reconstruction engine: loss terms and step hooks, and the engine as its plug-ins see it.

The engine's callbacks (callbacks/) import these names only, not the engine, so that the engine imports nothing of
theirs and they can be typed without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class LossTerm:
    """An extra loss on the current unit's quantized layers, added to the engine's ``loss_terms``.

    ``prepare(named_layers)`` runs outside the compiled step, once per step (graph replays: once per capture), and
    returns the tensors ``penalty(layers, tensors)`` reads besides the layers, e.g. looked up by layer name;
    ``penalty`` is traced into the compiled step (fused with the rest of the backward) and sees no names, so that
    units of the same shape keep sharing one compiled graph. ``penalty`` returns None to add nothing.
    """

    prepare: Callable[[list[tuple[str, nn.Module]]], list[torch.Tensor | None]]
    penalty: Callable[[list[nn.Module], list[torch.Tensor | None]], torch.Tensor | None]


class Phase(Protocol):
    """One unit trained in one pass: global iterations [start, start + iters)."""

    pass_name: str
    unit: int
    iters: int
    start: int


class Engine(Protocol):
    """The reconstruction engine as its plug-ins use it (quant/reconstruction.py implements it)."""

    step_hooks: dict[str, Callable[[Engine], None]]  # run before every engine iteration, in insertion order
    loss_terms: dict[str, LossTerm]
    device: torch.device

    @property
    def phase(self) -> Phase: ...

    @property
    def phase_iteration(self) -> int: ...

    def active_groups(self, phase: Phase) -> list[dict[str, Any]]: ...

    def set_lr(self, group: dict[str, Any], lr: float) -> None: ...

    def set_unit_modes(self, weight: str | None = None, activation: str | None = None) -> None: ...
