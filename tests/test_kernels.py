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

from hdrq_lightning.quant import kernels, noise
from hdrq_lightning.quant.noise import quantile_table_torch, residual_histogram, scaled_residual_histogram


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
from test_kernels import (adam_against_torch, adversarial, histc_counts, mask_checks, mix_checks, op_checks,
                          scaled_cases, scaled_expected, table_cases)
from hdrq_lightning.quant import kernels
from hdrq_lightning.quant.noise import quantile_table_torch, _QUANTILE_SLOTS, _EMPTY_BIN_WEIGHT
x, mask = adversarial()
print(json.dumps([bool(torch.equal(kernels.residual_histogram(x, 256, m, programs=3), histc_counts(x, m)))
                  for m in (None, mask)]))
print(json.dumps([bool(torch.equal(kernels.scaled_residual_histogram(*case, programs=3), scaled_expected(*case)))
                  for case in scaled_cases()]))
print(json.dumps([bool(torch.equal(kernels.quantile_table(c, _QUANTILE_SLOTS, _EMPTY_BIN_WEIGHT, torch.uint8),
                                   quantile_table_torch(c))) for c in table_cases()]))
print(json.dumps({{**mask_checks(kernels.keep_mask, "cpu"), **mix_checks(kernels.mix_rows, "cpu"),
                  "opcheck": op_checks()}}))
print(json.dumps([adam_against_torch(kernels.adam_update, wd, eps) for wd, eps in ((0.0, 1e-8), (0.01, 1e-3))]))
"""


def op_checks() -> bool:
    """torch.library.opcheck of the mask ops (schema, fake tensors' shapes and strides against the real result,
    AOT dispatch with dynamic shapes): what torch.compile relies on."""
    from hdrq_lightning.quant import quantizers

    quant = torch.randn(5, 3, 4, 6).contiguous(memory_format=torch.channels_last)
    seed = torch.tensor([3])
    results = [torch.library.opcheck(quantizers._mix_rows, (quant, torch.randn_like(quant), torch.tensor([4, 0, 2]),
                                                            seed, 1, 0.5)),
               torch.library.opcheck(quantizers._keep_mask, (seed, 1000, 0.3))]
    return all(outcome == "SUCCESS" for result in results for outcome in result.values())


def mix_checks(mix_rows, device: str) -> dict[str, bool]:
    """Properties of ``mix_rows(quant, fp, index, seed, first_row, prob)`` (kernels.mix_rows): every element is its
    source row's quantized or float value, in the sources' channels-last layout; the kept fraction is ``prob``
    (rows over several 4096-element chunks, the last ragged); rows 3:6 of a batch drawn with ``first_row=3`` are
    those rows of the whole batch's draw (data-parallel ranks); one source row at two batch rows is mixed twice,
    differently; probabilities 0 and 1 keep none and all."""
    seed = torch.tensor([11], device=device)
    quant = torch.arange(5 * 3 * 4 * 6, dtype=torch.float32).view(5, 3, 4, 6)
    quant = quant.contiguous(memory_format=torch.channels_last).to(device)
    fp = -1 - quant
    index = torch.tensor([4, 0, 0, 2], device=device)
    out = mix_rows(quant, fp, index, seed, 0, 0.5)
    layout = out.stride() == (72, 1, 18, 3) and out.shape == (4, 3, 4, 6)
    sources = (out == quant[index]) | (out == fp[index])
    ones = torch.ones(8, 3 * 4096 + 5, device=device)
    batch = torch.arange(8, device=device)
    kept = mix_rows(ones, ones * 0, batch, seed, 0, 0.3)
    part = mix_rows(ones, ones * 0, batch[3:6], seed, 3, 0.3)
    twice = mix_rows(ones, ones * 0, torch.tensor([1, 1], device=device), seed, 0, 0.5)
    return {
        "mix: layout and sources": layout and bool(sources.all()),
        "mix: fraction": abs(kept.mean().item() - 0.3) < 5 * (0.21 / kept.numel()) ** 0.5,
        "mix: rows of the batch": torch.equal(part, kept[3:6]),
        "mix: a row twice, two draws": not torch.equal(twice[0], twice[1]),
        "mix: none and all": torch.equal(mix_rows(quant, fp, index, seed, 0, 0.0), fp[index])
        and torch.equal(mix_rows(quant, fp, index, seed, 0, 1.0), quant[index]),
    }


def mask_checks(keep_mask, device: str) -> dict[str, bool]:
    """Properties of ``keep_mask(seed, n, prob)`` (kernels.keep_mask's signature) on a ragged length over four
    programs: the fraction kept is ``prob`` (within 5 sigma), also in each quarter of a program (each from its own
    Philox word), 0 and 1 keep none and all, one seed draws the same mask twice, neighbours and elements a quarter
    apart (the same Philox call) are uncorrelated, and another seed draws another mask."""
    n = 3 * 4096 + 123
    bound = 5 / n**0.5

    def draw(seed: int, prob: float) -> torch.Tensor:
        mask = keep_mask(torch.tensor([seed], device=device), n, prob)
        assert mask.dtype == torch.bool and mask.shape == (n,)
        return mask.float().cpu()

    half, third = draw(7, 0.5), draw(8, 0.3)
    centred = half - 0.5
    quarters = half[:4096].view(4, 1024).mean(dim=1)
    return {
        "fraction": abs(half.mean().item() - 0.5) < bound and abs(third.mean().item() - 0.3) < bound,
        "quarters": bool(((quarters - 0.5).abs() < 5 * 0.5 / 1024**0.5).all()),
        "none and all": not draw(7, 0.0).any() and bool(draw(7, 1.0).all()),
        "same seed, same mask": torch.equal(half, draw(7, 0.5)),
        "uncorrelated": all(abs(4 * (centred[:-lag] * centred[lag:]).mean().item()) < bound for lag in (1, 1024)),
        "other seed, other mask": abs((half == draw(9, 0.5)).float().mean().item() - 0.5) < bound,
    }


def adam_against_torch(update, weight_decay: float, eps: float, device: str = "cpu", steps: int = 7) -> float:
    """Largest difference (relative above 1, absolute below) between ``update`` (kernels.adam_update's signature) and torch.optim.Adam
    (learning rate in a tensor) over ``steps`` steps on a channels-last conv weight, a matrix of 2,500 elements
    (several programs, a ragged last block) and a scalar, with the learning rate changed between steps."""
    generator = torch.Generator().manual_seed(11)
    params = [torch.randn(shape, generator=generator) for shape in [(8, 5, 3, 3), (50, 50), ()]]
    params[0] = params[0].contiguous(memory_format=torch.channels_last)
    params = [p.to(device) for p in params]
    reference = [p.clone().requires_grad_(True) for p in params]
    lr = torch.tensor(0.01, device=device)
    optimizer = torch.optim.Adam(reference, lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=weight_decay,
                                 capturable=device != "cpu")
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    step = torch.zeros((), device=device)
    worst = 0.0
    for i in range(steps):
        grads = [torch.randn(p.shape, generator=generator).to(device) * (i + 1) for p in params]
        grads[0] = grads[0].contiguous(memory_format=torch.channels_last)
        lr.fill_(0.01 / (i + 1))
        for r, g in zip(reference, grads):
            r.grad = g.clone()
        optimizer.step()
        step += 1
        for p, g, (m, v) in zip(params, grads, moments):
            update(p, g, m, v, step, lr, 0.9, 0.999, eps, weight_decay)
        for p, r in zip(params, reference):
            worst = max(worst, ((p - r.detach()).abs() / (r.detach().abs() + 1)).max().item())
    return worst


def scaled_cases(device: str = "cpu") -> list[tuple]:
    """(t, scale, zero_point, qmin, qmax, bins) of the noise forward: a per-tensor activation step in float32 and
    bfloat16 (signed and unsigned grids), per-output-channel weight steps of a contiguous and a channels-last
    conv weight and of a Linear weight; values beyond both clip boundaries and exactly on them."""
    generator = torch.Generator().manual_seed(3)
    x, _ = adversarial(10_001)
    activation = (x * 0.37).to(device)
    cases = [(activation, torch.tensor(0.37), torch.tensor(0.0), 0, 15, 256),
             (activation.bfloat16(), torch.tensor(0.37), torch.tensor(0.0), 0, 15, 256),
             (activation - 1.0, torch.tensor(0.21), torch.tensor(3.0), -8, 7, 256)]
    conv = torch.randn(24, 16, 3, 3, generator=generator)
    conv_scale = torch.rand(24, 1, 1, 1, generator=generator) * 0.2 + 0.05
    conv_zero = torch.randint(0, 8, (24, 1, 1, 1), generator=generator).float()
    conv[:, 0, 0, 0] = (15 - conv_zero[:, 0, 0, 0]) * conv_scale[:, 0, 0, 0]  # on the upper boundary
    cases += [(conv.to(device), conv_scale, conv_zero, 0, 15, 256),
              (conv.to(device).to(memory_format=torch.channels_last), conv_scale, conv_zero, 0, 15, 256),
              (conv.reshape(24, -1).to(device), conv_scale.reshape(24, 1), conv_zero.reshape(24, 1), 0, 15, 128)]
    return [(t, s.to(device), z.to(device), qmin, qmax, bins) for t, s, z, qmin, qmax, bins in cases]


def table_cases(device: str = "cpu") -> list[torch.Tensor]:
    """Histograms to invert: a ReLU output's (one hot bin), a spread one, one occupied bin, an empty one (all
    elements clipped), sparse counts with zero bins between, and one over 2^24 elements."""
    generator = torch.Generator().manual_seed(5)
    x, _ = adversarial(100_000)
    spread = torch.histc(torch.round(x * 3.1) - x * 3.1, 256, -0.5, 0.5)
    hot = torch.histc(torch.round(x) - x, 256, -0.5, 0.5)
    single = torch.zeros(256)
    single[179] = 4000
    sparse = torch.where(torch.rand(256, generator=generator) < 0.1, torch.randint(1, 50, (256,), generator=generator),
                         0).float()
    huge = torch.randint(60_000, 70_000, (256,), generator=generator).float() * 3
    return [c.to(device) for c in (spread, hot, single, torch.zeros(256), sparse, huge)]


def scaled_expected(t, scale, zero_point, qmin, qmax, bins) -> torch.Tensor:
    x = t.float() / scale + zero_point  # what the noise forward computes in torch
    residuals = (torch.round(x) - x)[(x > qmin) & (x < qmax)]
    return torch.histc(residuals.cpu(), bins, -0.5, 0.5).to(t.device)


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
def test_triton_histogram_counts_like_histc_in_the_interpreter():
    """The kernels' logic on the CPU (TRITON_INTERPRET=1): the histograms (5 blocks over 3 programs, masked and
    not), the quantile table, QDrop's keep mask and input mixing (and opcheck of their ops), Adam."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = _INTERPRETED.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-5]) == [True, True]
    assert json.loads(lines[-4]) == [True] * len(scaled_cases())
    assert json.loads(lines[-3]) == [True] * len(table_cases())
    assert all(json.loads(lines[-2]).values()), lines[-2]
    assert max(json.loads(lines[-1])) < 2e-6  # torch.optim.Adam's update, to float32 rounding (steps of 1e-2)


def test_histogram_kernel_choice_is_checked(monkeypatch):
    from hdrq_lightning.quant import nvrtc

    monkeypatch.delenv("HDRQ_HISTOGRAM_KERNEL", raising=False)
    assert nvrtc.choice() == ("triton" if torch.version.hip else "auto")
    monkeypatch.setenv("HDRQ_HISTOGRAM_KERNEL", "triton")
    assert nvrtc.choice() == "triton"
    monkeypatch.setenv("HDRQ_HISTOGRAM_KERNEL", "fast")
    with pytest.raises(ValueError, match="HDRQ_HISTOGRAM_KERNEL='fast'"):
        nvrtc.choice()
    # asked for, the CUDA kernel is there or an error names what it does not take (here: a CPU tensor)
    monkeypatch.setenv("HDRQ_HISTOGRAM_KERNEL", "cuda")
    if kernels.triton is not None:
        with pytest.raises(RuntimeError, match="float32 cpu tensor of 3 elements in 256 bins"):
            kernels.scaled_residual_histogram(torch.ones(3), torch.tensor(1.0), torch.tensor(0.0), 0, 15, 256,
                                              programs=3)
    with pytest.raises(ValueError, match="unknown histogram backend"):
        kernels.scaled_residual_histogram(torch.ones(3), torch.tensor(1.0), torch.tensor(0.0), 0, 15, 256,
                                          backend="numpy")
    # the warps' histograms fit the 48 KiB of static shared memory up to 1024 bins
    assert nvrtc.supports(torch.bfloat16, 1024, 10) and not nvrtc.supports(torch.bfloat16, 2048, 10)
    assert not nvrtc.supports(torch.float64, 256, 10) and not nvrtc.supports(torch.float32, 256, 2**31)
    assert "typedef unsigned short storage_t" in nvrtc.source(torch.float16, True, 256)


def test_scaled_histogram_op_is_histc_on_the_cpu():
    for case in scaled_cases():
        torch.testing.assert_close(scaled_residual_histogram(*case), scaled_expected(*case), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scaled_histogram_kernels_count_like_histc_on_the_gpu(backend, monkeypatch):
    """Every case takes the kernel (``scaled_available``) and counts what the torch computation counts, with either
    backend (the Triton kernel, the NVRTC-compiled CUDA one): float32 / bfloat16 / float16, ragged and misaligned
    lengths (the CUDA kernel's scalar tail and unvectorised loads), per-row steps; also through the op in a compiled
    function."""
    monkeypatch.setenv("HDRQ_HISTOGRAM_KERNEL", backend)
    for t, scale, zero_point, qmin, qmax, bins in scaled_cases("cuda"):
        assert kernels.scaled_available(t, scale)
        expected = scaled_expected(t, scale, zero_point, qmin, qmax, bins)
        torch.testing.assert_close(kernels.scaled_residual_histogram(t, scale, zero_point, qmin, qmax, bins,
                                                                     backend=backend), expected, rtol=0, atol=0)
        torch.testing.assert_close(scaled_residual_histogram(t, scale, zero_point, qmin, qmax, bins), expected,
                                   rtol=0, atol=0)
    big = torch.relu(torch.randn(32 * 256 * 56 * 56 + 13, device="cuda")) * 2.3
    one = torch.tensor(0.29, device="cuda")
    for t in (big, big.bfloat16(), big.half(), big[5:].bfloat16(), big[3:]):  # the last two start unaligned
        torch.testing.assert_close(kernels.scaled_residual_histogram(t, one, one * 0, 0, 15, 256, backend=backend),
                                   scaled_expected(t, one, one * 0, 0, 15, 256), rtol=0, atol=0)
    compiled = torch.compile(lambda t: scaled_residual_histogram(t * 1.0, one, one * 0, 0, 15), dynamic=False)
    torch.testing.assert_close(compiled(big), scaled_expected(big, one, one * 0, 0, 15, 256), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_histogram_kernel_in_a_cuda_graph(monkeypatch):
    """The NVRTC kernel (asked for: no silent fallback to Triton's) is compiled at the warm-up at the latest and
    replays in a captured graph, counting the new contents."""
    monkeypatch.setenv("HDRQ_HISTOGRAM_KERNEL", "cuda")
    x, _ = adversarial(300_001)
    x = x.cuda().bfloat16()
    scale, zero = torch.tensor(0.3, device="cuda"), torch.tensor(0.0, device="cuda")
    static = torch.zeros_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        scaled_residual_histogram(static, scale, zero, -8, 7)  # warm-up: compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        counts = scaled_residual_histogram(static, scale, zero, -8, 7)
    static.copy_(x)
    graph.replay()
    torch.testing.assert_close(counts, scaled_expected(x, scale, zero, -8, 7, 256), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_quantile_table_is_searchsorted_on_the_gpu():
    for counts in table_cases("cuda"):
        table = noise._quantile_table(counts)
        assert table.dtype == torch.uint8
        # integer counts sum exactly below 2^24 in any order; above, the cdf may round apart in a few slots
        assert (table.long() != quantile_table_torch(counts).long()).sum().item() <= (
            0 if counts.sum() < 2**24 else 4)


def test_adam_kernel_walks_only_tensors_of_one_dense_layout():
    weight = torch.randn(8, 4, 3, 3)
    last = weight.contiguous(memory_format=torch.channels_last)
    assert kernels.dense_in_one_layout((weight, torch.zeros_like(weight)))
    assert kernels.dense_in_one_layout((last, torch.zeros_like(last)))
    assert not kernels.dense_in_one_layout((weight, last))  # same shape, other strides
    assert not kernels.dense_in_one_layout((weight[:, :2], weight[:, :2]))  # gaps
    assert kernels.dense_in_one_layout((torch.tensor(1.0), torch.tensor(2.0)))
    assert not kernels.adam_update_supported(weight, weight, weight, weight)  # CPU tensors: torch's Adam


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adam_kernel_is_torch_adam_on_the_gpu_and_in_a_captured_unit_step():
    """kernels.adam_update on CUDA, and UnitAdam.kernel_step replayed in a CUDA graph (state made by the eager
    warm-up step, the learning rate changed between replays) against torch's fused Adam replayed the same way."""
    from hdrq_lightning.quant.engine.module import UnitAdam

    assert max(adam_against_torch(kernels.adam_update, wd, eps, "cuda") for wd, eps in ((0.0, 1e-8), (0.01, 1e-3))) \
        < 2e-6
    generator = torch.Generator().manual_seed(2)
    shapes = [(64, 32, 3, 3), (300_001,), ()]
    start = [torch.randn(shape, generator=generator).cuda() for shape in shapes]
    start[0] = start[0].contiguous(memory_format=torch.channels_last)
    runs = {}
    for kind in ("kernel", "fused"):
        params = [p.clone().requires_grad_(True) for p in start]
        lr = torch.tensor(0.01, device="cuda")
        optimizer = UnitAdam([{"params": params[:2], "lr": lr, "unit": 0, "kind": "weight", "capturable": True},
                              {"params": params[2:], "lr": lr, "unit": 0, "kind": "activation_scale",
                               "capturable": True}], fused=True)
        grads = [torch.zeros_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        step = optimizer.kernel_step if kind == "kernel" else optimizer.step
        step()  # eager: creates the state
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        g = torch.Generator(device="cuda").manual_seed(3)
        for i in range(5):
            for grad in grads:
                grad.copy_(torch.randn(grad.shape, generator=g, device="cuda"))
            lr.fill_(0.01 / (i + 1))
            graph.replay()
        runs[kind] = [p.detach().clone() for p in params]
        assert float(optimizer.state[params[0]]["step"]) == 6
    for ours, theirs in zip(runs["kernel"], runs["fused"]):
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_keep_mask_kernel_on_the_gpu_compiled_and_captured():
    """kernels.keep_mask's and kernels.mix_rows' properties on the GPU (mask_checks, mix_checks), and the keep-mask
    op inside a compiled function captured in a CUDA graph: each replay draws a new mask (the seed is drawn inside
    the graph), each keeping about half."""
    from hdrq_lightning.quant.quantizers import keep_mask

    assert all(mask_checks(kernels.keep_mask, "cuda").values())
    assert all(mix_checks(kernels.mix_rows, "cuda").values())
    device = torch.device("cuda")
    x = torch.ones(64, 1000, device=device)
    compiled = torch.compile(lambda t: torch.where(keep_mask(tuple(t.shape), 0.5, device, kernel=True), t, 0.0),
                             dynamic=False)
    assert abs(compiled(x).mean().item() - 0.5) < 0.02
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        compiled(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(x)
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append(out.clone())
    assert all(abs(r.mean().item() - 0.5) < 0.02 for r in replays)
    assert not torch.equal(replays[0], replays[1])
