"""A GPU (or a share of one) per job when a sweep runs several jobs side by side on one machine.

Hydra's joblib launcher (``hydra/launcher=joblib hydra.launcher.n_jobs=<GPUs x gpu_slots>``) runs the jobs of a
multirun in parallel worker processes that all see every GPU. Each process claims a free slot, with an exclusive
``flock`` on a per-(GPU, slot) lock file in the machine's temp directory, keeps it for its lifetime (a worker runs
its jobs one after another on the same GPU) and waits when every slot is taken. With ``gpu_slots=k`` each GPU has
k slots: k jobs share it (a reconstruction step at batch 32 is latency-bound and uses a fraction of the card:
measured on one H200, 4 jobs at once give 1.25x the jobs per hour of one, README); slots are filled GPU by GPU
first, so a sweep with fewer jobs than GPUs still spreads them. The locks are released by the kernel when a
process ends, killed or not. A process that sees one GPU (a SLURM job with its own allocation,
``CUDA_VISIBLE_DEVICES`` set by hand, or a one-GPU machine, where k jobs simply share it) claims nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import IO

import torch

from hdrq_lightning.errors import ConfigError

log = logging.getLogger("hdrq")

_held: dict[str, object] = {}  # index and lock file of this process's GPU


def lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"hdrq-gpu-locks-{os.getuid()}"


def claim_gpu(poll_seconds: float = 5.0, slots: int = 1) -> int | None:
    """Index of this process's GPU (claimed once; waits while all ``slots`` of every GPU are held), or None with
    fewer than 2 GPUs."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ConfigError(f"gpu_slots={slots!r} must be a positive integer (jobs that share one GPU).")
    if "index" in _held:
        return _held["index"]  # type: ignore[return-value]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return None
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for slot, index in ((slot, index) for slot in range(slots) for index in range(count)):
            name = str(torch.cuda.get_device_properties(index).uuid)  # the same GPU whatever the visible order
            handle: IO[str] = open(directory / (f"{name}.lock" if slot == 0 else f"{name}.{slot}.lock"), "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _held.update(index=index, handle=handle)
            torch.cuda.set_device(index)
            log.info("claimed GPU %d (%s) for this process (slot %d of %d)", index,
                     torch.cuda.get_device_name(index), slot + 1, slots)
            return index
        if not waited:
            log.info("all %d slots of %d GPUs are claimed by other hdrq processes; waiting for one", slots * count,
                     count)
            waited = True
        time.sleep(poll_seconds)


def data_parallel(trainer_cfg) -> bool:
    """Whether the trainer config asks for DDP (``trainer=ddp`` or any ``ddp*`` strategy): Lightning then runs the
    command once per rank."""
    return str(trainer_cfg.get("strategy", "auto")).startswith("ddp")


def place_job(cfg) -> None:
    """With ``claim_gpu`` (default on), a single-device job on a multi-GPU machine runs on the GPU it claims."""
    trainer = cfg.trainer
    single = str(trainer.get("devices", 1)) in ("1", "auto") and not data_parallel(trainer)
    if cfg.get("claim_gpu", True) and single and str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda"):
        index = claim_gpu(slots=cfg.get("gpu_slots", 1))
        if index is not None:
            trainer.devices = [index]
