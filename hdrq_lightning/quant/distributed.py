"""Data-parallel reconstruction: DDP processes, gradients all-reduced by the engine itself.

The engine trains one unit at a time, with every other parameter frozen, and changes which parameters are
trainable as it moves from unit to unit. torch's DDP module wrapper fixes its gradient buckets when it is
built, so the engine keeps the plain LightningModule and averages the current unit's gradients itself right after
``manual_backward`` (:meth:`ReconstructionModule._sync_gradients`). Every rank holds the calibration cache and
draws the same global batch indices; each computes its slice of the global batch, so N ranks with batch B
reproduce one device with batch B.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class ManualSyncDDPStrategy(DDPStrategy):
    """DDP processes and process group, without wrapping the module in ``DistributedDataParallel``."""

    strategy_name = "ddp_manual_sync"

    def configure_ddp(self) -> None:
        # Keep the LightningModule unwrapped; ReconstructionModule all-reduces the gradients it trains.
        pass


def reconstruction_trainer_arguments(data_parallel: bool) -> dict:
    """The Trainer arguments the engine runs under: it draws its batches itself (no distributed sampler) and,
    data-parallel, all-reduces its gradients itself (``ManualSyncDDPStrategy``)."""
    return {"use_distributed_sampler": False, **({"strategy": ManualSyncDDPStrategy()} if data_parallel else {})}
