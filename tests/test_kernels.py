"""The Triton residual histogram counts what torch.histc counts: on the CPU through Triton's interpreter, on a GPU
natively (also inside a CUDA graph and under torch.compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hdrq_lightning.quant import kernels
from hdrq_lightning.quant.noise import residual_histogram


def adversarial(n: int = 10_001, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled values with what a histogram of rounding residuals can get wrong: exact zeros (ReLU), other
    on-grid values, ties of both parities and signs (torch.round goes to even), huge magnitudes, values next to
    bin edges, and a mask."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, generator=generator)) * 3.7 - torch.rand(n, generator=generator) * 0.3
    x[:50] = torch.round(x[:50])
    x[50:70] = torch.arange(-10, 10) + 0.5
    x[70:80] = torch.tensor([2.0**23 + 1, -(2.0**23) - 3, 2.0**22 + 0.5, -(2.0**22) - 0.5, 2.0**30, 1e-30, -1e-30,
                             0.49999997, -0.49999997, 0.5000001])
    # the neighbours of the bin edges on both sides of 0 (x - floor(x) rounds there for negative x, round(x) - x
    # does not)
    for start, edges in ((100, -torch.arange(1, 128) / 256), (354, torch.arange(1, 128) / 256)):
        x[start:start + 254] = torch.cat([torch.nextafter(edges, torch.tensor(-1.0)),
                                          torch.nextafter(edges, torch.tensor(1.0))])
    mask = torch.rand(n, generator=generator) < 0.7
    return x, mask


def histc_counts(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    residuals = torch.round(x) - x  # the rounding error: what HDRQ's noise stands in for
    return torch.histc(residuals if mask is None else residuals[mask], 256, -0.5, 0.5)


_INTERPRETED = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_kernels import adversarial, histc_counts
from hdrq_lightning.quant import kernels
x, mask = adversarial()
print(json.dumps([bool(torch.equal(kernels.residual_histogram(x, 256, m, programs=3), histc_counts(x, m)))
                  for m in (None, mask)]))
"""


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
def test_triton_histogram_counts_like_histc_in_the_interpreter():
    """The kernel's logic on the CPU (TRITON_INTERPRET=1): 5 blocks over 3 programs, masked and not."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = _INTERPRETED.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [True, True]


def test_histogram_op_is_histc_on_the_cpu():
    x, mask = adversarial()
    for m in (None, mask):
        torch.testing.assert_close(residual_histogram(x, 256, m), histc_counts(x, m), rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("size", [10_001, 32 * 256 * 56 * 56])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_histogram_counts_like_histc_on_the_gpu(size, masked):
    x, mask = adversarial(size)
    x, mask = x.cuda(), mask.cuda() if masked else None
    torch.testing.assert_close(kernels.residual_histogram(x, 256, mask), histc_counts(x, mask), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_histogram_in_a_cuda_graph_and_compiled():
    x, mask = adversarial(300_000)
    x, mask = x.cuda(), mask.cuda()
    expected = histc_counts(x, mask)
    compiled = torch.compile(lambda t, m: residual_histogram(t * 1.0, 256, m), dynamic=False)
    torch.testing.assert_close(compiled(x, mask), expected, rtol=0, atol=0)
    static = torch.zeros_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        residual_histogram(static, 256, mask)  # warm-up (compiles the kernel) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        counts = residual_histogram(static, 256, mask)
    static.copy_(x)
    graph.replay()
    torch.testing.assert_close(counts, expected, rtol=0, atol=0)
