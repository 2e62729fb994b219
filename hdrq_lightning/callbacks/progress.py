"""One progress line per stage run: what runs, how far it is (units and iterations for a reconstruction)."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from lightning.pytorch.callbacks.progress import ProgressBar
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Describe = Callable[[L.LightningModule], tuple[int, str]]


def optimizer_steps(pl_module: L.LightningModule) -> tuple[int, str]:
    """Progress of an ordinary training run: optimizer steps done, and the epoch."""
    trainer = pl_module.trainer
    return trainer.global_step, f"epoch {min(trainer.current_epoch + 1, trainer.max_epochs)}/{trainer.max_epochs}"


class StageProgress(ProgressBar):
    """A Rich progress bar over a stage's whole run (not per epoch), with a detail column from ``describe``.

    On a terminal it redraws in place; piped into a file it prints its final state once. Lightning's metrics are
    not shown (they are in the run dir's ``logs/metrics.csv`` and in W&B).
    """

    def __init__(self, label: str, total: Callable[[L.Trainer, L.LightningModule], int],
                 describe: Describe = optimizer_steps) -> None:
        super().__init__()
        self.label, self._total, self.describe = label, total, describe
        self._progress: Progress | None = None
        self._task = None
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        console = Console(stderr=True)
        if not console.is_terminal:  # a log file: the whole line, not cut at 80 columns
            console = Console(stderr=True, width=160)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                                  transient=False)
        done, detail = self.describe(pl_module)
        self._task = self._progress.add_task(self.label, total=self._total(trainer, pl_module), completed=done,
                                             detail=detail)
        self._progress.start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._progress is not None:
            done, detail = self.describe(pl_module)
            self._progress.update(self._task, completed=done, detail=detail)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop(None)

    def _stop(self, pl_module: L.LightningModule | None) -> None:
        if self._progress is not None:
            if pl_module is not None:
                done, detail = self.describe(pl_module)
                self._progress.update(self._task, completed=done, detail=detail)
            self._progress.stop()
            self._progress = None
