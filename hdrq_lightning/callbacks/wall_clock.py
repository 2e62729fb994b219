"""Wall-clock time of a run over all the processes that worked on it (a killed run resumes with its earlier time)."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import Callback


class WallClock(Callback):
    """Keeps in every checkpoint the seconds spent on the run up to it, so that a resumed run's total counts the
    earlier processes' work (up to their last checkpoint) and not only its own last part."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.perf_counter() if started is None else started
        self.earlier_seconds = 0.0

    def total_seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.total_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.earlier_seconds = float(state_dict["seconds"])
