"""Random draws in a compiled step on a GPU: Inductor's Philox (``torch.rand`` / ``torch.randint``) beside a
counter hash computed in integer torch ops (a benchmark, not a test).

    python bench/rng.py --out bench/results --name h200

Inductor draws every random element with one Philox-4x32-10 call (ten rounds of 32-bit multiplies, a quarter
of its output used), which is compute-bound: a 6.4M-element drop mask takes ~24 us on an H200 against ~2 us to
write it. The variants, each compiled and captured in a CUDA graph (``noise_sampling.graph_time_us``), on a
ResNet-50 layer3 block input (32 x 1024 x 14 x 14, bfloat16, channels-last):

- the activation quantizer's forward with no drop, with QDrop's drop drawn by Philox, and by the hash;
- HDRQ's noise forward as the package runs it (Philox ``randint``) and with the hash's bits;
- the bare draw (a materialised uint8 mask of ``u < 0.5``) by each generator;
- the drop and the bare mask by ``kernels.keep_mask`` (``quant.runtime.mask_kernel``: one Philox call for four
  elements, an opaque op).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.noise_sampling import graph_time_us  # noqa: E402
from bench.provenance import write_result  # noqa: E402
from hdrq_lightning.quant import noise  # noqa: E402
from hdrq_lightning.quant.quantizers import fake_quantize_nearest, fake_quantize_noise, keep_mask  # noqa: E402

_MASK32 = 0xFFFFFFFF


def _lowbias32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (C. Wellons' lowbias32) on int64 values in [0, 2^32): a bijection."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _MASK32
    return h ^ (h >> 16)


def hash_bits(numel: int, device: torch.device) -> torch.Tensor:
    """32 random bits per element (int64 in [0, 2^32)): two keyed rounds of lowbias32 over the element's index,
    the two keys one Philox draw per call (so CUDA-graph replays and torch.manual_seed govern them as any draw)."""
    keys = torch.randint(1 << 32, (2,), device=device)
    h = _lowbias32(torch.arange(numel, device=device, dtype=torch.int64) ^ keys[0])
    return _lowbias32(h ^ keys[1])


def hash_uniform(numel: int, device: torch.device) -> torch.Tensor:
    return (hash_bits(numel, device) >> 8).to(torch.float32) * 2.0**-24


def hash_noise(counts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sample_residual_histogram with the hash's 32 bits: 16 pick the slot, 16 the offset inside the bin."""
    bins = counts.numel()
    table = noise._quantile_table(counts)
    bits = hash_bits(like.numel(), like.device)
    jitter = (bits & 0xFFFF).to(torch.float32) * 2.0**-16
    return (-0.5 + (table[bits >> 16].to(torch.float32) + jitter) * (1.0 / bins)).reshape(like.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--replays", type=int, default=7)
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default="gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/rng.py times CUDA kernels: run it on a machine with a GPU.")
    device = torch.device("cuda")
    torch.manual_seed(0)
    block = torch.relu(torch.randn(32, 1024, 14, 14, device=device)).to(torch.bfloat16)
    block = block.contiguous(memory_format=torch.channels_last)
    scale, zero = torch.tensor(0.1, device=device), torch.tensor(0.0, device=device)

    def flat(t):
        return t.permute(0, 2, 3, 1).reshape(-1).float()

    def fq(t):
        return fake_quantize_nearest(flat(t), scale, zero, 0, 15)

    def drop_philox(t):
        x = flat(t)
        return torch.where(torch.rand(x.shape, device=x.device) < 0.5, x,
                           fake_quantize_nearest(x, scale, zero, 0, 15))

    def drop_hash(t):
        x = flat(t)
        return torch.where(hash_uniform(x.numel(), x.device) < 0.5, x, fake_quantize_nearest(x, scale, zero, 0, 15))

    def drop_kernel(t):
        x = flat(t)
        return torch.where(keep_mask(tuple(x.shape), 0.5, x.device, kernel=True), x,
                           fake_quantize_nearest(x, scale, zero, 0, 15))

    def noise_philox(t):
        return fake_quantize_noise(flat(t), scale, zero, 0, 15, "histogram", source=t.permute(0, 2, 3, 1).reshape(-1))

    def noise_hash(t):
        x = flat(t)
        xs = x / scale + zero
        in_range = (xs > 0) & (xs < 15)
        counts = noise.scaled_residual_histogram(t.permute(0, 2, 3, 1).reshape(-1), scale, zero, 0, 15)
        eps = hash_noise(counts, xs)
        return torch.where(in_range, x, x.new_zeros(())) + scale * torch.where(in_range, eps, torch.clamp(xs, 0, 15))

    def mask_philox(t):
        return (torch.rand(t.numel(), device=t.device) < 0.5).to(torch.uint8)

    def mask_hash(t):
        return (hash_uniform(t.numel(), t.device) < 0.5).to(torch.uint8)

    def mask_kernel(t):
        return keep_mask((t.numel(),), 0.5, t.device, kernel=True)

    variants = {"fake-quant, no drop": fq, "fake-quant, drop by philox": drop_philox,
                "fake-quant, drop by hash": drop_hash, "fake-quant, drop by keep_mask kernel": drop_kernel,
                "noise, philox (package)": noise_philox, "noise, hash": noise_hash, "mask only, philox": mask_philox,
                "mask only, hash": mask_hash, "mask only, keep_mask kernel": mask_kernel}
    rows = []
    for name, fn in variants.items():
        us = graph_time_us(fn, block, args.reps, args.replays)
        rows.append({"variant": name, "elements": block.numel(), "us_per_call": round(us, 1)})
        print(f"{name:32s} {us:8.1f} us", flush=True)
    # the hash's uniforms look uniform: mean, and the fraction in each of 16 equal bins
    u = hash_uniform(1 << 24, device)
    fractions = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    print(f"hash uniforms: mean {u.mean():.5f}, bin fractions {fractions.min():.5f}..{fractions.max():.5f}")
    if args.out:
        write_result(args.out, f"rng_{args.name}.json", {"unit": "us per call (CUDA graph)", "rows": rows})


if __name__ == "__main__":
    main()
