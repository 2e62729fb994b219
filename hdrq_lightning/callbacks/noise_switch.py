"""HDRQ's switch from noise-based quantization to real fake-quantization near the end of every unit."""

from __future__ import annotations

from typing import Any

from hdrq_lightning.callbacks.engine import EngineCallback
from hdrq_lightning.quant.hooks import Engine
from hdrq_lightning.quant.recipe import NoiseRecipe


class NoiseToFakeQuantSwitch(EngineCallback):
    """Noise for iterations < switch, round-to-nearest fake-quant (straight-through) from the switch on.

    With the paper's 20k iterations the switch is at 20000 - 3500; shorter runs keep the same proportion.
    """

    def __init__(self, noise: NoiseRecipe) -> None:
        self.noise = noise

    def phase_mode(self, iteration: int, iters: int) -> str:
        return "noise" if iteration < self.noise.switch_iteration(iters) else "nearest"

    def attach(self, engine: Engine) -> None:
        """Run before every engine iteration (also when the engine is driven without a Trainer)."""
        if self.noise.enabled:
            engine.step_hooks["noise_switch"] = self.before_step

    def before_step(self, engine: Engine) -> None:
        mode = self.phase_mode(engine.phase_iteration, engine.phase.iters)
        engine.set_unit_modes(weight=mode if self.noise.weights else None,
                               activation=mode if self.noise.activations else None)

    def state_dict(self) -> dict[str, Any]:
        return {"fakequant_iters": self.noise.fakequant_iters, "reference_iters": self.noise.reference_iters}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.noise.fakequant_iters = state_dict["fakequant_iters"]
        self.noise.reference_iters = state_dict["reference_iters"]
