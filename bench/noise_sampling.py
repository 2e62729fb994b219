"""HDRQ's noise forward on a GPU, piece by piece: the fake-quant forward beside the noise forward before and after
the fused histogram (x and the in-range mask computed inside the Triton kernel, the input read in its own dtype,
256 private bins) and the one-byte quantile table.

    python bench/noise_sampling.py --out bench/results --name h200

Each variant is compiled (torch.compile, static shapes) and captured in a CUDA graph of --reps calls, so the
times are GPU time without launch gaps (median of --replays replays, microseconds per call). The inputs are a
ResNet-50 layer3 block's: the block input (32 x 1024 x 14 x 14, a ReLU output, channels-last) in bfloat16 and
float32, an inner activation (32 x 256 x 14 x 14) and the 3x3 conv weight with per-channel steps. The fused
histogram's counts are checked equal to the torch computation's first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import write_result  # noqa: E402
from hdrq_lightning.quant import noise  # noqa: E402
from hdrq_lightning.quant.quantizers import (  # noqa: E402
    fake_quantize_nearest,
    fake_quantize_noise,
    flatten_in_memory_order,
)


def sample_int64_table(counts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The sampling as it was before the one-byte table (int64 bin indices)."""
    bins = counts.numel()
    cumulative = torch.cumsum(counts + noise._EMPTY_BIN_WEIGHT, dim=0)
    quantiles = (torch.arange(noise._QUANTILE_SLOTS, device=like.device, dtype=torch.float32) + 0.5) \
        / noise._QUANTILE_SLOTS
    table = torch.searchsorted(cumulative / cumulative[-1], quantiles, right=True).clamp_(max=bins - 1)
    bits = torch.randint(noise._QUANTILE_SLOTS << noise._JITTER_BITS, (like.numel(),), device=like.device)
    bin_index = table[bits >> noise._JITTER_BITS]
    jitter = (bits & ((1 << noise._JITTER_BITS) - 1)).to(torch.float32) * 2.0**-noise._JITTER_BITS
    return (-0.5 + (bin_index.to(torch.float32) + jitter) * (1.0 / bins)).reshape(like.shape)


def noise_forward(t, scale, zero, qmin, qmax, histogram: str, table: str, source=None):
    """The noise forward of quantizers.fake_quantize_noise with the histogram ('materialised': x and the mask
    written out for the x-and-mask kernel; 'fused': the scaled kernel) and table ('int64' | 'uint8') chosen."""
    x = t / scale + zero
    in_range = (x > qmin) & (x < qmax)
    if histogram == "fused":
        counts = noise.scaled_residual_histogram(t if source is None else source, scale, zero, qmin, qmax)
    else:
        counts = noise.residual_histogram(x, 256, in_range)
    eps = noise.sample_residual_histogram(counts, x) if table == "uint8" else sample_int64_table(counts, x)
    offset = torch.where(in_range, eps, torch.clamp(x, qmin, qmax) - zero)
    return torch.where(in_range, t, t.new_zeros(())) + scale * offset


def variants(tensor: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> dict:
    per_tensor = scale.numel() == 1

    def prepare(t):
        if not per_tensor:
            return t, t
        given, _ = flatten_in_memory_order(t)
        return (given if given.dtype == torch.float32 else given.float()), given

    def nearest(t):
        flat, _ = prepare(t)
        return fake_quantize_nearest(flat, scale, zero, qmin, qmax)

    def before(t):
        flat, _ = prepare(t)
        return noise_forward(flat, scale, zero, qmin, qmax, "materialised", "int64")

    def fused_histogram(t):
        flat, given = prepare(t)
        return noise_forward(flat, scale, zero, qmin, qmax, "fused", "int64", source=given)

    def one_byte_table(t):
        flat, _ = prepare(t)
        return noise_forward(flat, scale, zero, qmin, qmax, "materialised", "uint8")

    def after(t):  # what the package runs
        flat, given = prepare(t)
        return fake_quantize_noise(flat, scale, zero, qmin, qmax, "histogram", source=given)

    return {"fake-quant (nearest)": nearest, "noise before": before, "fused histogram only": fused_histogram,
            "table op only": one_byte_table, "noise after (package)": after}


def captured_us(fn, reps: int, replays: int) -> float:
    """Microseconds per call of ``fn()`` captured ``reps`` times in one CUDA graph (no launch gaps: what a
    captured step sees), median of ``replays`` replays; three warm-up calls on a side stream first."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return statistics.median(times)


def graph_time_us(fn, t: torch.Tensor, reps: int, replays: int) -> float:
    """``captured_us`` of ``fn(t)`` compiled (torch.compile, static shapes), without autograd."""
    compiled = torch.compile(fn, dynamic=False)
    with torch.no_grad():
        return captured_us(lambda: compiled(t), reps, replays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--replays", type=int, default=7)
    parser.add_argument("--out", default=None, help="folder of the JSON result (not written without)")
    parser.add_argument("--name", default="gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/noise_sampling.py times CUDA kernels: run it on a machine with a GPU.")
    torch.manual_seed(0)
    block_input = torch.relu(torch.randn(32, 1024, 14, 14, device="cuda")).to(memory_format=torch.channels_last)
    inner = torch.relu(torch.randn(32, 256, 14, 14, device="cuda")).to(memory_format=torch.channels_last)
    weight = torch.randn(256, 256, 3, 3, device="cuda").to(memory_format=torch.channels_last) * 0.05
    step = torch.tensor(0.21, device="cuda")
    weight_step = weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 7.5
    cases = {
        "block input bf16 (6.4M)": (block_input.bfloat16(), step, step * 0, 0, 15),
        "block input fp32 (6.4M)": (block_input, step, step * 0, 0, 15),
        "inner activation bf16 (1.6M)": (inner.bfloat16(), step, step * 0, 0, 15),
        "3x3 weight per channel (0.59M)": (weight, weight_step, torch.full_like(weight_step, 8.0), 0, 15),
    }
    rows = []
    for case, (t, scale, zero, qmin, qmax) in cases.items():
        source = flatten_in_memory_order(t)[0] if scale.numel() == 1 else t
        x = source.float() / scale + zero
        expected = torch.histc((torch.round(x) - x)[(x > qmin) & (x < qmax)], 256, -0.5, 0.5)
        assert torch.equal(noise.scaled_residual_histogram(source, scale, zero, qmin, qmax), expected), case
        row = {"case": case}
        for name, fn in variants(t, scale, zero, qmin, qmax).items():
            row[name] = round(graph_time_us(fn, t, args.reps, args.replays), 1)
        print(row, flush=True)
        rows.append(row)
    if args.out:
        write_result(args.out, f"noise_sampling_{args.name}.json", {"unit": "us per call (CUDA graph)",
                                                                  "rows": rows})


if __name__ == "__main__":
    main()
