"""Quantization-noise sampling for HDRQ's noise-based Hessian regularisation (paper Sec. 4.1).

Instead of rounding, the noise forward adds ``eps`` to the scaled tensor, with ``eps`` drawn from the
distribution of the quantization error that rounding would make, ``round(x) - x`` (the official code's
``(x_dequant - x) / s``: a 256-bin histogram over [-1/2, 1/2] of the unclipped elements), or from the paper's
idealisation U[-1/2, 1/2]. The sign matters on skewed residuals: the noise's mean is the mean rounding error, not
its negative. All randomness uses torch's global RNG, one draw per element in the logical order of the tensor
given (the activation quantizer passes its input's memory-order view, so channels-last and NCHW runs draw
different, equally distributed noise).
"""

import torch
from torch import Tensor

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.quant import kernels

NOISE_DISTRIBUTIONS: tuple[str, ...] = ("histogram", "uniform")

# Added to every histogram bin so that sampling never sees an all-zero histogram (every element
# clipped) without a host-side check; negligible next to the count of any occupied bin (>= 1).
_EMPTY_BIN_WEIGHT = 1e-6
# Resolution of the inverse-CDF table used to draw histogram bins.
_QUANTILE_SLOTS = 1 << 16
# Random bits of the uniform offset inside a bin (float32 has 24).
_JITTER_BITS = 24


def residual_histogram_torch(x: Tensor, bins: int, mask: Tensor | None) -> Tensor:
    """The histogram in torch ops (the op's implementation without Triton)."""
    residuals = (torch.round(x) - x).float()
    nonzero = residuals != 0
    counted, zeros = (nonzero, ~nonzero) if mask is None else (mask & nonzero, mask & ~nonzero)
    # histc has no weights: send the elements not counted outside [-1/2, 1/2], where histc ignores them.
    counts = torch.histc(torch.where(counted, residuals, torch.full_like(residuals, 2.0)), bins=bins, min=-0.5,
                         max=0.5)
    counts[bins // 2] += zeros.sum(dtype=counts.dtype)  # histc's bin of 0: floor((0 - min) * bins / (max - min))
    return counts


@torch.library.custom_op("hdrq::residual_histogram", mutates_args=())
def _residual_histogram(x: Tensor, bins: int, mask: Tensor | None) -> Tensor:
    if kernels.available(x) and bins & (bins - 1) == 0:
        return kernels.residual_histogram(x, bins, mask)
    return residual_histogram_torch(x, bins, mask)


@_residual_histogram.register_fake
def _(x: Tensor, bins: int, mask: Tensor | None) -> Tensor:
    return x.new_empty(bins, dtype=torch.float32)


@torch.no_grad()
def residual_histogram(x: Tensor, bins: int = 256, mask: Tensor | None = None) -> Tensor:
    """``bins``-bin histogram over [-1/2, 1/2] of the rounding errors ``round(x) - x`` where ``mask`` (all
    elements when None).

    The counts are those of ``torch.histc`` on the masked residuals. On CUDA (power-of-two ``bins``) one Triton
    kernel counts them (quant/kernels.py); elsewhere exact zeros (every element on the grid: after a ReLU, half of a
    tensor) are counted by a reduction and added to the bin of 0 afterwards, as histc's atomic increments
    serialise on one hot bin (much slower on a ReLU output). An opaque op for torch.compile.
    """
    return _residual_histogram(x, bins, mask)


@torch.library.custom_op("hdrq::scaled_residual_histogram", mutates_args=())
def _scaled_residual_histogram(t: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                               bins: int) -> Tensor:
    return kernels.scaled_residual_histogram(t, scale, zero_point, qmin, qmax, bins)


@_scaled_residual_histogram.register_fake
def _(t: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, bins: int) -> Tensor:
    return t.new_empty(bins, dtype=torch.float32)


@torch.no_grad()
def scaled_residual_histogram(t: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                              bins: int = 256, scaled: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The counts of ``residual_histogram(x, bins, (x > qmin) & (x < qmax))`` for ``x = t / scale + zero_point``
    (``t`` read as float32), the noise forward's histogram.

    On CUDA (``kernels.scaled_available``, power-of-two ``bins``) one Triton kernel computes ``x`` and the range
    test itself, so a compiled step never writes ``x`` and the mask out for the histogram (and a bfloat16 ``t``
    is read in bfloat16); elsewhere ``x`` and the mask are computed in torch, or taken from ``scaled`` (``(x,
    mask)``, when the caller has them already)."""
    if kernels.scaled_available(t, scale) and bins & (bins - 1) == 0:
        return _scaled_residual_histogram(t, scale, zero_point, qmin, qmax, bins)
    if scaled is None:
        x = t.float() / scale + zero_point
        scaled = x, (x > qmin) & (x < qmax)
    return residual_histogram(scaled[0], bins, scaled[1])


def _table_dtype(bins: int) -> torch.dtype:
    """The smallest integer type of the quantile table's bin indices: the per-element gather reads it (a 64 KiB
    uint8 table for 256 bins, against 512 KiB of int64: it stays in the SM's L1)."""
    return torch.uint8 if bins <= 256 else torch.int16 if bins <= 1 << 15 else torch.int32


def quantile_table_torch(counts: Tensor) -> Tensor:
    """The op's torch implementation: entry ``s`` is the bin holding quantile ``(s + 1/2) / _QUANTILE_SLOTS``."""
    bins = counts.numel()
    cumulative = torch.cumsum(counts + _EMPTY_BIN_WEIGHT, dim=0)
    quantiles = (torch.arange(_QUANTILE_SLOTS, device=counts.device, dtype=torch.float32) + 0.5) / _QUANTILE_SLOTS
    table = torch.searchsorted(cumulative / cumulative[-1], quantiles, right=True).clamp_(max=bins - 1)
    return table.to(_table_dtype(bins))


@torch.library.custom_op("hdrq::quantile_table", mutates_args=())
def _quantile_table(counts: Tensor) -> Tensor:
    bins = counts.numel()
    if kernels.triton is not None and counts.is_cuda and bins & (bins - 1) == 0:
        return kernels.quantile_table(counts, _QUANTILE_SLOTS, _EMPTY_BIN_WEIGHT, _table_dtype(bins))
    return quantile_table_torch(counts)


@_quantile_table.register_fake
def _(counts: Tensor) -> Tensor:
    return counts.new_empty(_QUANTILE_SLOTS, dtype=_table_dtype(counts.numel()))


@torch.no_grad()
def sample_residual_histogram(counts: Tensor, like: Tensor) -> Tensor:
    """One draw per element of ``like`` (same shape and dtype) from the histogram ``counts`` of rounding errors
    over [-1/2, 1/2]: a bin in proportion to its count, uniform inside the bin (see rounding_residual_noise).

    The quantile table is an opaque op (one Triton kernel on CUDA): a compiled step gathers from it as a
    materialised one-byte table (64 KiB for 256 bins, cached near the SMs) rather than recomputing the conversion
    of an int64 searchsorted result inside the gather."""
    bins = counts.numel()
    table = _quantile_table(counts)
    # one random integer per element: its top bits pick the slot, its low 24 bits the jitter (torch.rand's
    # float32 resolution): one random draw per element, and the table gather, not the random bits, dominates the cost
    bits = torch.randint(_QUANTILE_SLOTS << _JITTER_BITS, (like.numel(),), device=like.device)
    bin_index = table[bits >> _JITTER_BITS]
    jitter = (bits & ((1 << _JITTER_BITS) - 1)).to(torch.float32) * 2.0**-_JITTER_BITS
    noise = -0.5 + (bin_index.to(torch.float32) + jitter) * (1.0 / bins)
    return noise.reshape(like.shape).to(like.dtype)


@torch.no_grad()
def rounding_residual_noise(
    x: Tensor, distribution: str = "histogram", bins: int = 256, mask: Tensor | None = None
) -> Tensor:
    """Sample one noise value per element of ``x`` (same shape, detached) in [-1/2, 1/2].

    ``x`` is the tensor already divided by its step (plus zero point). ``"histogram"`` builds a
    ``bins``-bin histogram over [-1/2, 1/2] of the rounding errors ``round(x) - x`` of the elements where
    ``mask`` is true (all elements when ``mask`` is None), samples bins in proportion to their counts
    and jitters uniformly inside the bin. ``"uniform"`` draws from U[-1/2, 1/2].

    Bins are drawn by inverse-CDF sampling through a quantile table: ``_QUANTILE_SLOTS`` equally likely
    slots, each mapped once to the bin holding its quantile, then one gather per element. Every bin's
    probability is exact to 1/_QUANTILE_SLOTS; unlike ``torch.multinomial`` (or a per-element
    ``searchsorted``) the cost is one gather per element, with no host sync, so it can be graph-captured.
    """
    if distribution == "uniform":
        return torch.rand(x.shape, device=x.device, dtype=x.dtype) - 0.5
    if distribution != "histogram":
        raise ConfigError(f"Unknown noise distribution {distribution!r}; use one of {NOISE_DISTRIBUTIONS}.")
    return sample_residual_histogram(residual_histogram(x, bins, mask), x)
