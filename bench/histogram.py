"""HDRQ's residual histogram on a GPU: torch.histc (masked input + zeros counted apart) vs the Triton kernel, and the
noise forward's CUDA kernel (quant/nvrtc.py) beside its Triton one.

    python bench/histogram.py --sizes 6422528 25690112

The inputs look like a scaled ReLU output (half exact zeros) with a 90% in-range mask, as in the noise forward of
a ResNet-50 layer1 block at batch 32 (6.4M and 25.7M elements). Prints ms per call (CUDA events, median of
--repeats) and checks that both count the same. Then the noise forward's kernel (``scaled_residual_histogram``: the
scaling and range test inside, on a bfloat16 input; a tensor-core counter, one-hot products in place of
tl.histogram, timed 4.6 ms against its 0.115 ms on 6.4M elements on an H200 and was removed), and the NVRTC-compiled
CUDA kernel that replaced it where it compiles, on the bfloat16 and float32 input. First, the noise
draw's quantile table (us per call replayed in a CUDA graph): the package's scan kernel beside the comparison
kernel it replaced and torch's searchsorted path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.noise_sampling import captured_us  # noqa: E402
from hdrq_lightning.quant import kernels  # noqa: E402
from hdrq_lightning.quant.noise import (  # noqa: E402
    _EMPTY_BIN_WEIGHT,
    _QUANTILE_SLOTS,
    quantile_table_torch,
    residual_histogram_torch,
)

if kernels.triton is not None:
    import triton.language as tl

    @kernels.triton.jit
    def _compare_table_kernel(counts_ptr, table_ptr, empty_weight, BINS: tl.constexpr, SLOTS: tl.constexpr,
                              SLOT_BLOCK: tl.constexpr):
        # the quantile table kernel as it was before the scan (7aad4ec): every program compares its SLOT_BLOCK
        # quantiles with all BINS cdf values
        weights = tl.load(counts_ptr + tl.arange(0, BINS)).to(tl.float32) + empty_weight
        cumulative = tl.cumsum(weights, axis=0)
        cdf = cumulative / tl.max(cumulative, axis=0)
        slots = tl.program_id(0) * SLOT_BLOCK + tl.arange(0, SLOT_BLOCK)
        quantiles = (slots.to(tl.float32) + 0.5) / SLOTS
        below = tl.sum((cdf[None, :] <= quantiles[:, None]).to(tl.int32), axis=1)
        tl.store(table_ptr + slots, tl.minimum(below, BINS - 1).to(table_ptr.dtype.element_ty))


def compare_table(counts: torch.Tensor) -> torch.Tensor:
    table = torch.empty(_QUANTILE_SLOTS, dtype=torch.uint8, device=counts.device)
    _compare_table_kernel[(_QUANTILE_SLOTS // 64,)](counts, table, _EMPTY_BIN_WEIGHT, BINS=counts.numel(),
                                                    SLOTS=_QUANTILE_SLOTS, SLOT_BLOCK=64, num_warps=4)
    return table


def time_tables() -> None:
    """The noise draw's quantile table from a ReLU output's 256-bin histogram: the package's kernel (a scan per
    block of slots) at a few slot blocks, the comparison kernel it replaced and torch's searchsorted path."""
    x = torch.relu(torch.randn(1 << 20, device="cuda")) * 7.3
    counts = residual_histogram_torch(x, 256, x < 15)
    reference = quantile_table_torch(counts)
    assert torch.equal(kernels.quantile_table(counts, _QUANTILE_SLOTS, _EMPTY_BIN_WEIGHT, torch.uint8), reference)
    times = {"torch searchsorted": captured_us(lambda: quantile_table_torch(counts), 50, 7),
             "comparison kernel (before)": captured_us(lambda: compare_table(counts), 50, 7)}
    for block in (256, 1024, 4096):
        times[f"scan kernel, {block} slots a program"] = captured_us(lambda b=block: kernels.quantile_table(
            counts, _QUANTILE_SLOTS, _EMPTY_BIN_WEIGHT, torch.uint8, slot_block=b), 50, 7)
    print("quantile table (us per call, CUDA graph): " + ", ".join(f"{name} {us:.1f}" for name, us in times.items()),
          flush=True)


def time_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[6_422_528, 25_690_112])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--configs", nargs="+", default=["2048x4x8"],
                        help="Triton launch choices BLOCKxWARPSxPROGRAMS_PER_SM to time (both kernels)")
    parser.add_argument("--cuda-blocks", type=int, nargs="+", default=[2, 4, 8, 16],
                        help="blocks per SM of the NVRTC-compiled CUDA kernel to time")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/histogram.py times a CUDA kernel: run it on a machine with a GPU.")
    print(torch.cuda.get_device_name())
    time_tables()
    for size in args.sizes:
        x = torch.relu(torch.randn(size, device="cuda")) * 7.3
        mask = torch.rand(size, device="cuda") < 0.9
        assert torch.equal(kernels.residual_histogram(x, 256, mask), residual_histogram_torch(x, 256, mask))
        histc = time_ms(lambda x=x, mask=mask: residual_histogram_torch(x, 256, mask), args.repeats)
        reads = time_ms(lambda x=x, mask=mask: (x.sum(), mask.sum()), args.repeats)  # ~ the memory-read floor
        print(f"{size} elements: torch.histc path {histc:.3f} ms; reading x and mask (two sums) {reads:.3f} ms",
              flush=True)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for config in args.configs:
            block, warps, per_sm = (int(v) for v in config.split("x"))
            programs = max(1, min(-(-size // block), sms * per_sm))
            triton_ms = time_ms(lambda x=x, mask=mask, b=block, w=warps, p=programs: kernels.residual_histogram(
                x, 256, mask, programs=p, block=b, num_warps=w), args.repeats)
            print(f"  Triton {config}: {triton_ms:.3f} ms ({histc / triton_ms:.1f}x)", flush=True)
        # the noise forward's kernel (x = t / s + z and the range test inside), on the block's bfloat16 input,
        # at the same launch choices (the package's default: 2048x4x8)
        t, step, zero = (x * 0.37).bfloat16(), torch.tensor(0.37, device="cuda"), torch.tensor(0.0, device="cuda")
        bf16_read = time_ms(lambda t=t: t.sum(), args.repeats)
        for config in args.configs:
            block, warps, per_sm = (int(v) for v in config.split("x"))
            programs = max(1, min(-(-size // block), sms * per_sm))
            scaled = time_ms(lambda t=t, s=step, z=zero, b=block, w=warps, p=programs:
                             kernels.scaled_residual_histogram(t, s, z, 0, 15, 256, programs=p, block=b, num_warps=w,
                                                               backend="triton"), args.repeats)
            print(f"  scaled kernel on the bf16 input, {config}: {scaled:.3f} ms (reading it: {bf16_read:.3f} ms)",
                  flush=True)
        # the NVRTC-compiled CUDA kernel (shared-memory atomics) beside the Triton kernel at its default launch,
        # both replayed in a CUDA graph (what a captured step sees; the CUDA kernel's ctypes launch is slow eagerly)
        for source in (t, t.float()):
            expected = kernels.scaled_residual_histogram(source, step, zero, 0, 15, 256, backend="triton")
            triton_us = captured_us(lambda t=source, s=step, z=zero: kernels.scaled_residual_histogram(
                t, s, z, 0, 15, 256, backend="triton"), 20, 10)
            timings = []
            for per_sm in args.cuda_blocks:
                blocks = max(1, min(-(-size // 1024), sms * per_sm))
                counts = kernels.scaled_residual_histogram(source, step, zero, 0, 15, 256, programs=blocks,
                                                           backend="cuda")
                assert torch.equal(counts, expected), "the CUDA and Triton kernels count differently"
                cuda_us = captured_us(lambda t=source, s=step, z=zero, b=blocks: kernels.scaled_residual_histogram(
                    t, s, z, 0, 15, 256, programs=b, backend="cuda"), 20, 10)
                timings.append(f"{per_sm}/SM {cuda_us:.1f}")
            print(f"  in a CUDA graph, us per call on the {str(source.dtype)[6:]} input: Triton {triton_us:.1f}; "
                  f"CUDA kernel (blocks per SM) {', '.join(timings)}", flush=True)

if __name__ == "__main__":
    main()
