"""HDRQ's weight-distance regulariser: lambda * sum over layers of ||W - W_source||_F (not squared).

Keeping every expert near the BN-folded source weights bounds the distance between experts (triangle
inequality, paper Eq. 10), which keeps their merge on a flat path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from hdrq_lightning.callbacks.engine import EngineCallback
from hdrq_lightning.quant.hooks import Engine, LossTerm


class DistanceRegularizer(EngineCallback):
    """Adds ``weight * sum ||W - W_source||`` over the trained layers of the current unit to the engine's loss."""

    def __init__(self, source_weights: Mapping[str, torch.Tensor], weight: float = 5e-2) -> None:
        self.source_weights = dict(source_weights)
        self.weight = weight

    def attach(self, engine: Engine) -> None:
        """Add the penalty to the engine's loss (also when the engine is driven without a Trainer)."""
        engine.loss_terms["distance"] = LossTerm(self.sources, self.distance)

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.source_weights = {k: v.to(pl_module.device) for k, v in self.source_weights.items()}

    def sources(self, layers: list[tuple[str, torch.nn.Module]]) -> list[torch.Tensor | None]:
        """The source weight of each named layer (None where there is none), on the layer's device."""
        found = []
        for name, layer in layers:
            source = self.source_weights.get(f"{name}.weight")
            if source is not None and source.device != layer.weight.device:
                source = self.source_weights[f"{name}.weight"] = source.to(layer.weight.device)
            found.append(source)
        return found

    def distance(self, layers: list[torch.nn.Module], sources: list[torch.Tensor | None]) -> torch.Tensor | None:
        """``weight * sum ||W - S||`` over the layers with a source (traced into the engine's compiled step)."""
        terms = [torch.linalg.vector_norm(layer.weight - source) for layer, source in zip(layers, sources)
                 if source is not None]
        if not terms or self.weight == 0:
            return None
        return self.weight * torch.stack(terms).sum()

    def penalty(self, layers: list[tuple[str, torch.nn.Module]]) -> torch.Tensor | None:
        """The penalty of named layers."""
        return self.distance([layer for _, layer in layers], self.sources(layers))

    def __getstate__(self) -> dict[str, Any]:
        # its loss term goes to the compile-ahead worker by pickle; Lightning attaches the module's log methods to
        # callbacks, which would drag the whole engine along
        return {"source_weights": self.source_weights, "weight": self.weight}

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weight = state_dict["weight"]
