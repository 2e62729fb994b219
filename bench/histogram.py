"""HDRQ's residual histogram on a GPU: torch.histc (masked input + zeros counted apart) vs the Triton kernel.

    python bench/histogram.py --sizes 6422528 25690112

The inputs look like a scaled ReLU output (half exact zeros) with a 90% in-range mask, as in the noise forward of
a ResNet-50 layer1 block at batch 32 (6.4M and 25.7M elements). Prints ms per call (CUDA events, median of
--repeats) and checks that both count the same.
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
        for config in args.configs:
            block, warps, per_sm = (int(v) for v in config.split("x"))
            programs = max(1, min(-(-size // block), sms * per_sm))
            triton_ms = time_ms(lambda x=x, mask=mask, b=block, w=warps, p=programs: kernels.residual_histogram(
                x, 256, mask, programs=p, block=b, num_warps=w), args.repeats)
            print(f"  Triton {config}: {triton_ms:.3f} ms ({histc / triton_ms:.1f}x)")


if __name__ == "__main__":
    main()
