"""HDRQ's residual histogram on a GPU: torch.histc (masked input + zeros counted apart) vs the Triton kernel.

    python bench/histogram.py --sizes 6422528 25690112

The inputs look like a scaled ReLU output (half exact zeros) with a 90% in-range mask, as in the noise forward of
a ResNet-50 layer1 block at batch 32 (6.4M and 25.7M elements). Prints ms per call (CUDA events, median of
--repeats) and checks that both count the same. Then the noise forward's kernel (``scaled_residual_histogram``: the
scaling and range test inside, on a bfloat16 input) with its two counters: tl.histogram (used) and one-hot products
on the tensor cores (``counter="dot"``, not yet timed: a candidate for the noise step's histogram time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hdrq_lightning.quant import kernels  # noqa: E402
from hdrq_lightning.quant.noise import residual_histogram_torch  # noqa: E402


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
    parser.add_argument("--configs", nargs="+", default=["2048x8x4"],
                        help="Triton launch choices BLOCKxWARPSxPROGRAMS_PER_SM to time")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/histogram.py times a CUDA kernel: run it on a machine with a GPU.")
    print(torch.cuda.get_device_name())
    for size in args.sizes:
        x = torch.relu(torch.randn(size, device="cuda")) * 7.3
        mask = torch.rand(size, device="cuda") < 0.9
        assert torch.equal(kernels.residual_histogram(x, 256, mask), residual_histogram_torch(x, 256, mask))
        histc = time_ms(lambda x=x, mask=mask: residual_histogram_torch(x, 256, mask), args.repeats)
        reads = time_ms(lambda x=x, mask=mask: (x.sum(), mask.sum()), args.repeats)  # ~ the memory-read floor
        print(f"{size} elements: torch.histc path {histc:.3f} ms; reading x and mask (two sums) {reads:.3f} ms")
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        # the noise forward's kernel (x = t / s + z and the range test inside): tl.histogram vs one-hot tensor-core
        # products, on the block's bfloat16 input (the default launch)
        t, step, zero = (x * 0.37).bfloat16(), torch.tensor(0.37, device="cuda"), torch.tensor(0.0, device="cuda")
        counted = {counter: kernels.scaled_residual_histogram(t, step, zero, 0, 15, 256, counter=counter)
                   for counter in ("histogram", "dot")}
        assert torch.equal(counted["histogram"], counted["dot"])
        scaled = {counter: time_ms(lambda c=counter, t=t, s=step, z=zero: kernels.scaled_residual_histogram(
            t, s, z, 0, 15, 256, counter=c), args.repeats) for counter in ("histogram", "dot")}
        print(f"  scaled bf16 input: tl.histogram {scaled['histogram']:.3f} ms, tensor-core one-hot "
              f"{scaled['dot']:.3f} ms")
        for config in args.configs:
            block, warps, per_sm = (int(v) for v in config.split("x"))
            programs = max(1, min(-(-size // block), sms * per_sm))
            triton_ms = time_ms(lambda x=x, mask=mask, b=block, w=warps, p=programs: kernels.residual_histogram(
                x, 256, mask, programs=p, block=b, num_warps=w), args.repeats)
            print(f"  Triton {config}: {triton_ms:.3f} ms ({histc / triton_ms:.1f}x)")


if __name__ == "__main__":
    main()
