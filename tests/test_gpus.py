"""GPU claiming for parallel sweeps on one machine (CUDA calls stubbed: the locking is what is tested)."""

from __future__ import annotations

import types

import pytest
import torch
from omegaconf import OmegaConf

from hdrq_lightning import gpus


@pytest.fixture
def two_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=f"GPU-{i}"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"stub {i}")
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(gpus, "lock_dir", lambda: tmp_path)
    monkeypatch.setattr(gpus, "_held", {})
    return chosen


def _as_another_process() -> dict:
    """Forget this process's claim but keep its lock file open (as another process would hold it)."""
    held = dict(gpus._held)
    gpus._held.clear()
    return held


def test_processes_claim_different_gpus_and_free_them_on_exit(two_gpus):
    assert gpus.claim_gpu() == 0
    assert gpus.claim_gpu() == 0  # once per process
    first = _as_another_process()
    assert gpus.claim_gpu() == 1
    second = _as_another_process()
    first["handle"].close()  # the first process ends: the kernel drops its lock
    assert gpus.claim_gpu() == 0
    assert two_gpus == [0, 1, 0]
    second["handle"].close()


def test_place_job_sets_the_trainer_device_only_for_single_device_jobs(two_gpus):
    cfg = OmegaConf.create({"claim_gpu": True, "trainer": {"accelerator": "auto", "devices": 1}})
    gpus.place_job(cfg)
    assert cfg.trainer.devices == [0]
    ddp = OmegaConf.create({"claim_gpu": True, "trainer": {"accelerator": "gpu", "devices": 2, "strategy": "ddp"}})
    gpus.place_job(ddp)
    assert ddp.trainer.devices == 2
    off = OmegaConf.create({"claim_gpu": False, "trainer": {"accelerator": "auto", "devices": 1}})
    gpus.place_job(off)
    assert off.trainer.devices == 1


def test_no_claim_with_one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gpus, "_held", {})
    assert gpus.claim_gpu() is None


def test_slots_let_k_processes_share_each_gpu_filled_gpu_by_gpu(two_gpus):
    """gpu_slots=2 on two GPUs: the first two processes take one GPU each, the next two the second slots, a
    fifth waits (here: the claim would block, so only the four are taken); a freed slot is taken again."""
    held = []
    for expected in (0, 1, 0, 1):
        assert gpus.claim_gpu(slots=2) == expected
        held.append(_as_another_process())
    held[2]["handle"].close()  # the third process (GPU 0, slot 2) ends
    assert gpus.claim_gpu(slots=2) == 0
    for other in held:
        other["handle"].close()


@pytest.mark.parametrize("slots", [0, -1, 1.5, True])
def test_bad_slot_counts_are_refused(two_gpus, slots):
    from hdrq_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="gpu_slots"):
        gpus.claim_gpu(slots=slots)


def test_place_job_reads_the_slot_count(two_gpus, monkeypatch):
    seen = []
    monkeypatch.setattr(gpus, "claim_gpu", lambda slots=1: seen.append(slots) or 1)
    cfg = OmegaConf.create({"claim_gpu": True, "gpu_slots": 4, "trainer": {"accelerator": "auto", "devices": 1}})
    gpus.place_job(cfg)
    assert seen == [4] and cfg.trainer.devices == [1]
