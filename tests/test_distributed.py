"""Two CPU processes (gloo) reconstruct exactly what one process does with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = str(Path(__file__).with_name("ddp_reconstruction_worker.py"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_reconstruction_equals_single_process(tmp_path):
    single = tmp_path / "single.pt"
    subprocess.run([sys.executable, WORKER, "1", str(single)], check=True, timeout=300, capture_output=True)

    port = str(_free_port())
    ranks = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
               "NODE_RANK": "0", "LOCAL_RANK": str(rank), "RANK": str(rank)}
        ranks.append(subprocess.Popen([sys.executable, WORKER, "2", str(tmp_path / "ddp.pt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for process in ranks:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]

    expected, distributed = torch.load(single), torch.load(tmp_path / "ddp.pt")
    assert expected.keys() == distributed.keys()
    for key in expected:
        torch.testing.assert_close(distributed[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)
