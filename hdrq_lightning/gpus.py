"""One GPU per job when a sweep runs several jobs side by side on one machine.

Hydra's joblib launcher (``hydra/launcher=joblib hydra.launcher.n_jobs=<GPUs>``) runs the jobs of a multirun in
parallel worker processes that all see every GPU. Each process claims the first GPU nobody else holds, with an
exclusive ``flock`` on a per-GPU lock file in the machine's temp directory, keeps it for its lifetime (a worker
runs its jobs one after another on the same GPU) and waits when every GPU is taken. The locks are released by
the kernel when a process ends, killed or not. A process that sees one GPU (a SLURM job with its own
allocation, ``CUDA_VISIBLE_DEVICES`` set by hand) claims nothing.
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

log = logging.getLogger("hdrq")

_held: dict[str, object] = {}  # index and lock file of this process's GPU


def lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"hdrq-gpu-locks-{os.getuid()}"


def claim_gpu(poll_seconds: float = 5.0) -> int | None:
    """Index of this process's GPU (claimed once; waits while all are held), or None with fewer than 2 GPUs."""
    if "index" in _held:
        return _held["index"]  # type: ignore[return-value]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return None
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(count):
            name = str(torch.cuda.get_device_properties(index).uuid)  # the same GPU whatever the visible order
            handle: IO[str] = open(directory / f"{name}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _held.update(index=index, handle=handle)
            torch.cuda.set_device(index)
            log.info("claimed GPU %d (%s) for this process", index, torch.cuda.get_device_name(index))
            return index
        if not waited:
            log.info("all %d GPUs are claimed by other hdrq processes; waiting for one", count)
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
        index = claim_gpu()
        if index is not None:
            trainer.devices = [index]
