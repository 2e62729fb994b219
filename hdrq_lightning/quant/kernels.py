"""A Triton kernel for HDRQ's per-step residual histogram on CUDA devices (the torch code runs elsewhere).

The torch path needs its input masked into a materialised tensor, counts exact zeros apart and lets ``torch.histc``
increment shared bins with atomics. This kernel reads the scaled tensor (and mask) once; every program counts its
share in a private histogram (``tl.histogram``) and adds it to the global counts once, in about the time of reading
its inputs (bench/histogram.py measures both; bench/results/histogram_h100.md). Counts are exact integers (int32
accumulators), equal to torch.histc's.

Importable without Triton: ``available()`` says whether the kernel can run.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_BLOCK = 2048
_NUM_WARPS = 4
_PROGRAMS_PER_SM = 8  # the fastest of bench/histogram.py's grid (bench/results/histogram_h100.md)


def available(x: Tensor) -> bool:
    """Whether the Triton histogram counts ``x``: a float32 CUDA tensor (the kernel's arithmetic), Triton importable."""
    return triton is not None and x.is_cuda and x.dtype == torch.float32


if triton is not None:

    @triton.jit
    def _residual_histogram_kernel(x_ptr, mask_ptr, counts_ptr, n, HAS_MASK: tl.constexpr, BINS: tl.constexpr,
                                   BLOCK: tl.constexpr):
        # bins 0..BINS-1 are histc's bins of round(x) - x over [-1/2, 1/2]; uncounted elements go to bin BINS,
        # i.e. into the upper half of a 2*BINS-bin private histogram that is never written out
        step = tl.num_programs(0) * BLOCK
        counts = tl.zeros([2 * BINS], dtype=tl.int32)
        for start in range(tl.program_id(0) * BLOCK, n, step):
            offsets = start + tl.arange(0, BLOCK)
            keep = offsets < n
            x = tl.load(x_ptr + offsets, mask=keep, other=0.0).to(tl.float32)
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + offsets, mask=keep, other=0).to(tl.int1))
            # round(x) - x with torch.round's half-to-even ties; every step is exact (x - floor(x) is not, for
            # negative x of small magnitude), and the last subtraction is torch's own
            below = tl.floor(x)
            half = below + 0.5
            odd = (below * 0.5 - tl.floor(below * 0.5)) != 0
            residual = tl.where((x > half) | ((x == half) & odd), below + 1.0, below) - x
            # histc's bin: floor((r - min) * bins / (max - min)), the upper edge in the last bin
            index = tl.minimum(((residual + 0.5) * BINS).to(tl.int32), BINS - 1)
            counts += tl.histogram(tl.where(keep, index, BINS), 2 * BINS)
        bins = tl.arange(0, 2 * BINS)
        tl.atomic_add(counts_ptr + bins, counts, mask=bins < BINS)


def residual_histogram(x: Tensor, bins: int, mask: Tensor | None, programs: int | None = None,
                       block: int = _BLOCK, num_warps: int = _NUM_WARPS) -> Tensor:
    """float32 counts of ``round(x) - x`` (where ``mask``) in ``bins`` bins over [-1/2, 1/2], as torch.histc.

    ``bins`` must be a power of two (tl.histogram's size). ``programs`` (default: a few per SM) is the number of
    Triton programs sharing the elements, ``block`` the elements each reads per loop step (bench/histogram.py
    times the choices).
    """
    if bins & (bins - 1):
        raise ValueError(f"the Triton histogram needs a power-of-two bin count, got {bins}")
    x = x.reshape(-1)
    mask = None if mask is None else mask.reshape(-1)
    counts = torch.zeros(bins, dtype=torch.int32, device=x.device)
    n = x.numel()
    if n:
        if programs is None:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            programs = max(1, min(triton.cdiv(n, block), sms * _PROGRAMS_PER_SM))
        _residual_histogram_kernel[(programs,)](x, x if mask is None else mask, counts, n, HAS_MASK=mask is not None,
                                                BINS=bins, BLOCK=block, num_warps=num_warps)
    return counts.to(torch.float32)
