"""Kill a stage run after its first checkpoint, re-run it, and run it uninterrupted elsewhere: the helper of the
resume tests (a resumed run must end with exactly the weights of an uninterrupted one on the CPU)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from hdrq_lightning.artifacts import StageRun, load_weights

# Timeouts catch hangs, not slowness: far above the slowest machine's time for these tiny runs.
HANG = 3600


def wait_for(path: Path, process: subprocess.Popen, timeout: float = HANG) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def killed_resumed_and_uninterrupted(stage_args: list[str], runs: Path, run_dir: str, inputs: str,
                                     cwd: Path) -> tuple[dict, dict, str]:
    """``hdrq <stage_args>`` killed once ``runs/<run_dir>/checkpoints/last.ckpt`` exists, then re-run to the end;
    the same command uninterrupted in a second runs dir holding a copy of ``runs/<inputs>``. Returns (resumed
    weights, uninterrupted weights, the re-run's output)."""
    env = {**os.environ, "HDRQ_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "hdrq_lightning.cli", *stage_args]
    target = runs / run_dir
    process = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(target / "checkpoints/last.ckpt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not StageRun(target).is_done()
    assert not list(target.rglob("*.tmp")), "a killed run left a half-written file"
    finished = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=HANG)
    assert finished.returncode == 0, finished.stderr[-2000:]
    other = runs.parent / f"{runs.name}_uninterrupted"
    shutil.copytree(runs / inputs, other / inputs)
    straight = subprocess.run(args, env={**env, "HDRQ_RUNS_DIR": str(other)}, cwd=cwd, capture_output=True,
                              text=True, timeout=HANG)
    assert straight.returncode == 0, straight.stderr[-2000:]
    resumed = load_weights(target / "model.safetensors")
    uninterrupted = load_weights(other / run_dir / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    return resumed, uninterrupted, finished.stdout + finished.stderr


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
