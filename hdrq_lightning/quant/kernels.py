"""Triton kernels of the reconstruction engine on CUDA devices (the torch code runs elsewhere).

HDRQ's per-step residual histogram: the torch path needs its input masked into a materialised tensor, counts exact
zeros apart and lets ``torch.histc`` increment shared bins with atomics. ``residual_histogram`` reads the scaled
tensor (and mask) once; every program counts its share in a private histogram (``tl.histogram``) and adds it to the
global counts once (bench/histogram.py measures both; bench/results/histogram_h100.md). ``scaled_residual_histogram``
(what the noise forward uses) computes the scaled tensor and the range test itself from the quantizer's input; where
NVRTC compiles it, a CUDA C kernel with shared-memory atomics counts instead (quant/nvrtc.py, the same counts).
Counts are exact integers (int32 accumulators), equal to torch.histc's. ``quantile_table`` turns counts into the
noise draw's inverse-CDF table in one kernel.

``adam_update``: torch.optim.Adam's update of one tensor with the step count and learning rate on the device, for
the captured step (``UnitAdam.kernel_step``). ``keep_mask``: QDrop's Bernoulli masks with four elements per Philox
call, and ``mix_rows``: QDrop's input mixing straight from the cache rows (both with ``quant.runtime.mask_kernel``).

Importable without Triton: ``available()`` and ``scaled_available()`` say whether the histogram kernels can run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hdrq_lightning.quant import nvrtc

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


_SCALED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def standard_dense(t: Tensor) -> bool:
    """Whether ``t`` fills its memory without gaps in a standard layout, contiguous or channels-last: dim 0 then is
    outermost, each of its rows one block of memory (what the kernels walking rows or storages rely on)."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def scaled_available(t: Tensor, scale: Tensor) -> bool:
    """Whether ``scaled_residual_histogram`` runs on ``t``: a CUDA float tensor (float32, bfloat16 or float16, read
    as float32), Triton importable, and a step that is one scalar or one per index of ``t``'s dim 0 when dim 0 is
    outermost in memory (a contiguous or channels-last weight quantized per output channel)."""
    if triton is None or not t.is_cuda or t.dtype not in _SCALED_DTYPES or t.numel() == 0:
        return False
    if scale.numel() == 1:
        return True
    return (scale.numel() == t.shape[0] and scale.dim() == t.dim() and scale.shape[0] == t.shape[0]
            and standard_dense(t))


if triton is not None:

    @triton.jit
    def _residual_bin(x, BINS: tl.constexpr):
        """torch.histc's bin of ``round(x) - x`` over [-1/2, 1/2] in BINS bins."""
        # round(x) - x with torch.round's half-to-even ties; every step is exact (x - floor(x) is not, for
        # negative x of small magnitude), and the last subtraction is torch's own
        below = tl.floor(x)
        half = below + 0.5
        odd = (below * 0.5 - tl.floor(below * 0.5)) != 0
        residual = tl.where((x > half) | ((x == half) & odd), below + 1.0, below) - x
        # histc's bin: floor((r - min) * bins / (max - min)), the upper edge in the last bin
        return tl.minimum(((residual + 0.5) * BINS).to(tl.int32), BINS - 1)

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
            counts += tl.histogram(tl.where(keep, _residual_bin(x, BINS), BINS), 2 * BINS)
        bins = tl.arange(0, 2 * BINS)
        tl.atomic_add(counts_ptr + bins, counts, mask=bins < BINS)


    @triton.jit
    def _scaled_residual_histogram_kernel(t_ptr, scale_ptr, zero_ptr, counts_ptr, n, inner, qmin, qmax,
                                          PER_ROW: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr):
        # x = t / scale + zero_point computed here (t read once, in its own dtype); counted where qmin < x < qmax.
        # tl.histogram: elements not counted go to bin 0 and are taken off bin 0 at the end (a BINS-bin histogram,
        # whose cost grows with the bins, instead of a 2*BINS one with a spill bin). (Counting with one-hot
        # products on the tensor cores instead was exact but 40x slower on an H200: bench/results/README.md.)
        step = tl.num_programs(0) * BLOCK
        counts = tl.zeros([BINS], dtype=tl.int32)
        skipped = tl.zeros([BLOCK], dtype=tl.int32)
        tensor_scale = tl.load(scale_ptr)
        tensor_zero = tl.load(zero_ptr)
        for start in range(tl.program_id(0) * BLOCK, n, step):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < n
            t = tl.load(t_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            # IEEE division (Triton's `/` on float32 is the approximate div.full): the x torch computes
            if PER_ROW:
                row = offsets // inner
                x = (tl.math.div_rn(t, tl.load(scale_ptr + row, mask=inside, other=1.0))
                     + tl.load(zero_ptr + row, mask=inside, other=0.0))
            else:
                x = tl.math.div_rn(t, tensor_scale) + tensor_zero
            keep = inside & (x > qmin) & (x < qmax)
            index = _residual_bin(x, BINS)
            counts += tl.histogram(tl.where(keep, index, 0), BINS)
            skipped += tl.where(keep, 0, 1)
        bins = tl.arange(0, BINS)
        counts -= tl.where(bins == 0, tl.sum(skipped, axis=0), 0)
        tl.atomic_add(counts_ptr + bins, counts)


    @triton.jit
    def _quantile_table_kernel(counts_ptr, table_ptr, empty_weight, BINS: tl.constexpr, SLOTS: tl.constexpr,
                               SLOT_BLOCK: tl.constexpr):
        # table[s] = the bin holding quantile q_s = (s + 1/2) / SLOTS of the histogram: torch.searchsorted(cdf, q_s,
        # right=True) = #{b : cdf[b] <= q_s}. cdf[b] <= q_s <=> s >= first[b] = ceil(cdf[b] * SLOTS - 1/2) (exact:
        # SLOTS is a power of two below 2^23), so a block of slots [s0, s0 + SLOT_BLOCK) holds #{b : first[b] < s0}
        # plus the running count of the first[b] that fall inside it: one BINS-long scan and one histogram per
        # program, not a SLOT_BLOCK x BINS comparison
        weights = tl.load(counts_ptr + tl.arange(0, BINS)).to(tl.float32) + empty_weight
        cumulative = tl.cumsum(weights, axis=0)
        cdf = tl.math.div_rn(cumulative, tl.max(cumulative, axis=0))  # IEEE division, as torch's
        first = tl.ceil(cdf * SLOTS - 0.5).to(tl.int32)
        start = tl.program_id(0) * SLOT_BLOCK
        below = tl.sum((first < start).to(tl.int32), axis=0)
        local = first - start
        # first[b] outside the block go to bin SLOT_BLOCK, in the upper half that is never stored
        arrivals = tl.histogram(tl.where((local >= 0) & (local < SLOT_BLOCK), local, SLOT_BLOCK), 2 * SLOT_BLOCK)
        offsets = tl.arange(0, 2 * SLOT_BLOCK)
        table = tl.minimum(below + tl.cumsum(arrivals, axis=0), BINS - 1)
        tl.store(table_ptr + start + offsets, table.to(table_ptr.dtype.element_ty), mask=offsets < SLOT_BLOCK)


    @triton.jit
    def _keep_mask_kernel(seed_ptr, out_ptr, n, threshold, BLOCK: tl.constexpr):
        # out[i] = (32 random bits < threshold), threshold = round(prob * 2^32): Bernoulli(prob) to 2^-32. One
        # Philox-4x32-10 call gives four words (Inductor's tl.rand spends a call per element and keeps one):
        # word k of counter (program * BLOCK/4 + j) decides element program * BLOCK + k * BLOCK/4 + j
        QUARTER: tl.constexpr = BLOCK // 4
        seed = tl.load(seed_ptr)
        j = tl.arange(0, QUARTER)
        w0, w1, w2, w3 = tl.randint4x(seed, (tl.program_id(0) * QUARTER + j).to(tl.uint32))
        first = tl.program_id(0) * BLOCK + j
        tl.store(out_ptr + first, w0.to(tl.int64) < threshold, mask=first < n)
        tl.store(out_ptr + first + QUARTER, w1.to(tl.int64) < threshold, mask=first + QUARTER < n)
        tl.store(out_ptr + first + 2 * QUARTER, w2.to(tl.int64) < threshold, mask=first + 2 * QUARTER < n)
        tl.store(out_ptr + first + 3 * QUARTER, w3.to(tl.int64) < threshold, mask=first + 3 * QUARTER < n)


    @triton.jit
    def _mix_quarter(quant_ptr, fp_ptr, out_ptr, source, target, offsets, row_numel, word, threshold):
        inside = offsets < row_numel
        quant = tl.load(quant_ptr + source + offsets, mask=inside)
        fp = tl.load(fp_ptr + source + offsets, mask=inside)
        tl.store(out_ptr + target + offsets, tl.where(word.to(tl.int64) < threshold, quant, fp), mask=inside)

    @triton.jit
    def _mix_rows_kernel(quant_ptr, fp_ptr, index_ptr, seed_ptr, out_ptr, row_numel, first_row, threshold,
                         BLOCK: tl.constexpr):
        # out row r = where(keep, quant[index[r]], fp[index[r]]) element by element in memory order; keep = a Philox
        # word < threshold, four elements per call as in _keep_mask_kernel, keyed by the global row first_row + r
        # and the element's place in its row: ranks holding other rows of the batch draw the rest of one mask
        QUARTER: tl.constexpr = BLOCK // 4
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        j = tl.arange(0, QUARTER)
        counter = ((first_row + row) * tl.num_programs(1) + chunk) * QUARTER + j
        w0, w1, w2, w3 = tl.randint4x(tl.load(seed_ptr), counter.to(tl.uint32))
        source = tl.load(index_ptr + row).to(tl.int64) * row_numel
        target = row.to(tl.int64) * row_numel
        offsets = chunk * BLOCK + j
        _mix_quarter(quant_ptr, fp_ptr, out_ptr, source, target, offsets, row_numel, w0, threshold)
        _mix_quarter(quant_ptr, fp_ptr, out_ptr, source, target, offsets + QUARTER, row_numel, w1, threshold)
        _mix_quarter(quant_ptr, fp_ptr, out_ptr, source, target, offsets + 2 * QUARTER, row_numel, w2, threshold)
        _mix_quarter(quant_ptr, fp_ptr, out_ptr, source, target, offsets + 3 * QUARTER, row_numel, w3, threshold)


    @triton.jit
    def _adam_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, lr_ptr, n, beta1, beta2,
                     log2_beta1, log2_beta2, eps, weight_decay, WEIGHT_DECAY: tl.constexpr, BLOCK: tl.constexpr):
        # torch.optim.Adam's update (amsgrad and maximize off), as its fused CUDA kernel writes it, on BLOCK elements
        # per program: the step count (already incremented) and the learning rate are read from device memory
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        step = tl.load(step_ptr)
        lr = tl.load(lr_ptr)
        param = tl.load(param_ptr + offsets, mask=mask, other=0.0)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
        if WEIGHT_DECAY:
            grad = grad + weight_decay * param
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        bias_correction1 = 1 - tl.exp2(step * log2_beta1)  # 1 - beta1^step
        bias_correction2_sqrt = tl.sqrt(1 - tl.exp2(step * log2_beta2))
        denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
        param = param - (lr / bias_correction1) * exp_avg / denom
        tl.store(param_ptr + offsets, param, mask=mask)
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)


def adam_update_supported(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> bool:
    """Whether ``adam_update`` takes these: Triton importable, float32 CUDA tensors of one dense layout."""
    tensors = (param, grad, exp_avg, exp_avg_sq)
    return (triton is not None and all(t.is_cuda and t.dtype == torch.float32 for t in tensors)
            and dense_in_one_layout(tensors))


def dense_in_one_layout(tensors: tuple[Tensor, ...]) -> bool:
    """Whether the tensors have one shape and strides and fill their memory without gaps in a standard layout
    (contiguous or channels-last), so that their storages can be walked element by element in step."""
    first = tensors[0]
    return standard_dense(first) and all(t.shape == first.shape and t.stride() == first.stride() for t in tensors)


def adam_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
                beta1: float, beta2: float, eps: float, weight_decay: float, block: int = 1024) -> None:
    """One Adam update of ``param`` (and its moments) in place, ``step`` (already incremented) and ``lr`` read on
    the device, so a CUDA graph can capture it. One kernel per tensor, ``block`` elements per program: every SM
    takes part also for a unit's few small tensors, where torch's fused multi-tensor Adam runs one block per 65,536
    elements (17 of 132 SMs for a ResNet-50 layer3 block's weights)."""
    n = param.numel()
    if n == 0:
        return
    # the tensors share one dense layout: their storages are updated element by element, in memory order
    flat = [t.as_strided((n,), (1,)) if not t.is_contiguous() else t.view(-1)
            for t in (param, grad, exp_avg, exp_avg_sq)]
    _adam_kernel[(triton.cdiv(n, block),)](*flat, step, lr, n, beta1, beta2, math.log2(beta1), math.log2(beta2),
                                           eps, weight_decay, WEIGHT_DECAY=weight_decay != 0, BLOCK=block)


_MASK_BLOCK = 4096


def keep_mask(seed: Tensor, n: int, prob: float) -> Tensor:
    """``n`` independent Bernoulli(``prob``) booleans from the Philox stream keyed by ``seed`` (a one-element int64
    CUDA tensor, read on the device so that a captured graph's replays draw anew when the seed is drawn inside the
    graph): the same distribution as ``torch.rand(n) < prob``, other draws, a quarter of the Philox calls and
    one byte written per element."""
    threshold = _threshold(prob)
    if n >= 1 << 34:
        raise ValueError(f"keep_mask draws at most 2^34 elements (32-bit Philox counters), got {n}")
    out = torch.empty(n, dtype=torch.bool, device=seed.device)
    if n:
        _keep_mask_kernel[(triton.cdiv(n, _MASK_BLOCK),)](seed, out, n, threshold, BLOCK=_MASK_BLOCK)
    return out


def _threshold(prob: float) -> int:
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"a keep probability must lie in [0, 1], got {prob}")
    return min(round(prob * 2.0**32), 1 << 32)


def mix_rows_supported(quant: Tensor, fp: Tensor) -> bool:
    """Whether ``mix_rows`` takes these sources: Triton importable, CUDA tensors of one shape, dtype, strides and
    standard dense layout (``standard_dense``)."""
    return triton is not None and quant.is_cuda and fp.device == quant.device and _one_dense_kind(quant, fp)


def _one_dense_kind(quant: Tensor, fp: Tensor) -> bool:
    return quant.dtype == fp.dtype and dense_in_one_layout((quant, fp))


def mix_rows(quant: Tensor, fp: Tensor, index: Tensor, seed: Tensor, first_row: int, prob: float) -> Tensor:
    """QDrop's input mixing in one pass: row ``r`` of the result holds ``quant[index[r]]`` where a draw keeps the
    quantized value (probability ``prob``), else ``fp[index[r]]``, in ``quant``'s layout (``mix_rows_supported``
    says which sources it takes). The draws come four elements per Philox call keyed by ``seed``
    (a one-element int64 CUDA tensor) and the global row ``first_row + r``, so data-parallel ranks draw together
    one batch's mask. Nothing is gathered or masked apart: one read of each source row, one write."""
    if not _one_dense_kind(quant, fp):  # (the device is Triton's business: its interpreter runs on the CPU)
        raise ValueError("mix_rows needs two sources of one shape, dtype and contiguous or channels-last layout")
    threshold = _threshold(prob)
    rows, row_numel = index.numel(), math.prod(quant.shape[1:])
    out = torch.empty_strided((rows, *quant.shape[1:]), (row_numel, *quant.stride()[1:]), dtype=quant.dtype,
                              device=quant.device)
    if rows and row_numel:
        chunks = triton.cdiv(row_numel, _MASK_BLOCK)
        if (first_row + rows) * chunks * (_MASK_BLOCK // 4) >= 1 << 32:
            raise ValueError("mix_rows draws at most 2^34 elements (32-bit Philox counters)")
        _mix_rows_kernel[(rows, chunks)](quant, fp, index, seed, out, row_numel, first_row, threshold,
                                         BLOCK=_MASK_BLOCK)
    return out


def quantile_table(counts: Tensor, slots: int, empty_weight: float, dtype: torch.dtype,
                   slot_block: int = 256) -> Tensor:
    """The inverse-CDF table of the histogram ``counts`` (a power-of-two number of bins): entry ``s`` is the bin
    holding quantile ``(s + 1/2) / slots`` of ``counts + empty_weight``, as ``dtype`` (one kernel in place of
    cumsum, division, searchsorted and the conversion)."""
    bins = counts.numel()
    slot_block = min(slot_block, slots)
    if bins & (bins - 1) or slot_block & (slot_block - 1) or slots % slot_block:
        raise ValueError(f"the Triton table needs power-of-two bins and slot blocks dividing the slots, got {bins} "
                         f"bins, {slots} slots in blocks of {slot_block}")
    table = torch.empty(slots, dtype=dtype, device=counts.device)
    _quantile_table_kernel[(slots // slot_block,)](counts, table, empty_weight, BINS=bins, SLOTS=slots,
                                                   SLOT_BLOCK=slot_block, num_warps=4)
    return table


def scaled_residual_histogram(t: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, bins: int,
                              programs: int | None = None, block: int = _BLOCK,
                              num_warps: int = _NUM_WARPS, backend: str = "auto") -> Tensor:
    """float32 counts of ``round(x) - x`` for ``x = t / scale + zero_point`` where ``qmin < x < qmax``, in ``bins``
    bins over [-1/2, 1/2] (torch.histc's), reading ``t`` once; see ``scaled_available`` for what it takes.

    ``backend``: "auto" follows ``HDRQ_HISTOGRAM_KERNEL`` (``nvrtc.choice``; unset: the NVRTC-compiled CUDA kernel,
    quant/nvrtc.py, where it compiles and takes the input, else the Triton kernel); "cuda" or "triton" insist on one.
    Both count exactly the same. ``programs``: the grid (Triton programs or CUDA blocks; default a few per SM);
    ``block`` and ``num_warps``: the Triton kernel's launch."""
    if backend not in ("auto", "cuda", "triton"):
        raise ValueError(f"unknown histogram backend {backend!r}: use auto, cuda or triton")
    if bins & (bins - 1):
        raise ValueError(f"the Triton histogram needs a power-of-two bin count, got {bins}")
    per_row = scale.numel() > 1
    if per_row and not t.is_contiguous():  # channels-last: dim 0 stays outermost, the rows stay contiguous runs
        t = t.permute(0, *range(2, t.dim()), 1)
    flat = t.reshape(-1)
    n = flat.numel()
    counts = torch.zeros(bins, dtype=torch.int32, device=t.device)
    if n:
        sms = torch.cuda.get_device_properties(t.device).multi_processor_count if programs is None else 0
        scale = scale.detach().reshape(-1).to(torch.float32).contiguous()
        zero_point = zero_point.detach().reshape(-1).to(torch.float32).contiguous()
        inner = n // max(1, scale.numel())
        choice = nvrtc.choice() if backend == "auto" else backend  # the argument overrides the environment
        cuda_kernel = (nvrtc.compile_histogram(flat.dtype, per_row, bins, t.device)
                       if choice != "triton" and t.is_cuda and nvrtc.supports(flat.dtype, bins, n)
                       else None)  # (CPU tensors: Triton's interpreter)
        if choice == "cuda" and cuda_kernel is None:
            raise RuntimeError(f"the CUDA histogram kernel was asked for (backend={backend!r}, HDRQ_HISTOGRAM_KERNEL) "
                               f"but does not count this input: a {flat.dtype} {t.device.type} tensor of {n} elements "
                               f"in {bins} bins (nvrtc.supports), or NVRTC failed to compile it (see the warning)")
        if cuda_kernel is not None:
            blocks = programs or max(1, min(triton.cdiv(n, nvrtc.THREADS * 4), sms * nvrtc.BLOCKS_PER_SM))
            nvrtc.launch_histogram(cuda_kernel, flat, scale, zero_point, counts, inner, qmin, qmax, blocks)
        else:
            programs = programs or max(1, min(triton.cdiv(n, block), sms * _PROGRAMS_PER_SM))
            _scaled_residual_histogram_kernel[(programs,)](flat, scale, zero_point, counts, n, inner, float(qmin),
                                                           float(qmax), PER_ROW=per_row, BINS=bins, BLOCK=block,
                                                           num_warps=num_warps)
    return counts.to(torch.float32)


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
