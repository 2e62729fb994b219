"""Two processes (gloo on CPU; NCCL on two GPUs) reconstruct what one process does with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = str(Path(__file__).with_name("ddp_reconstruction_worker.py"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reconstruct(tmp_path, accelerator: str, graphs: bool, qdrop: bool = False) -> tuple[dict, dict]:
    extra = [accelerator] + (["graphs"] if graphs else []) + (["qdrop"] if qdrop else [])
    single = tmp_path / "single.pt"
    subprocess.run([sys.executable, WORKER, "1", str(single), *extra], check=True, timeout=3600, capture_output=True)

    port = str(_free_port())
    ranks = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
               "NODE_RANK": "0", "LOCAL_RANK": str(rank), "RANK": str(rank)}
        ranks.append(subprocess.Popen([sys.executable, WORKER, "2", str(tmp_path / "ddp.pt"), *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for process in ranks:
        output, _ = process.communicate(timeout=3600)
        assert process.returncode == 0, output[-3000:]
    return torch.load(single), torch.load(tmp_path / "ddp.pt")


@pytest.mark.parametrize("method", ["brecq", "qdrop"])
def test_two_process_reconstruction_equals_single_process(tmp_path, method):
    """QDrop's random input mixing and in-block drop are drawn for the global batch and sliced per rank."""
    expected, distributed = _reconstruct(tmp_path, "cpu", graphs=False, qdrop=method == "qdrop")
    assert expected.keys() == distributed.keys()
    for key in expected:
        torch.testing.assert_close(distributed[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_two_gpu_reconstruction_equals_single_gpu(tmp_path, graphs):
    """NCCL all-reduce of the current unit's gradients (captured in the step's CUDA graph with graphs)."""
    expected, distributed = _reconstruct(tmp_path, "gpu", graphs=graphs)
    assert expected.keys() == distributed.keys()
    for key in expected:
        a, b = expected[key].float(), distributed[key].float()
        # GPU reductions in another order: a few grid elements may round the other way, never many
        close = torch.isclose(b, a, atol=1e-4, rtol=1e-3)
        assert close.float().mean() > 0.995, key
