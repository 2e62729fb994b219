"""The engine callbacks' common base: a Lightning callback that hooks into the reconstruction engine."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from hdrq_lightning.quant.hooks import Engine


class EngineCallback(Callback):
    """Attaches itself to the engine (its step hooks or loss terms) when the Trainer sets up.

    ``attach`` is public so that the engine can also be driven without a Trainer (benchmarks, the compile-ahead
    worker, tests): call it on the engine once.
    """

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self.attach(pl_module)

    def attach(self, engine: Engine) -> None:
        raise NotImplementedError
