"""HDRQ's residual histogram as a CUDA C kernel compiled at run time by NVRTC.

Triton exposes no shared-memory atomics; its ``tl.histogram`` counts with warp ballots (one per bin bit) and
popcounts, work that grows with the bins (our reading of its lowering), and the Triton kernel runs 7x slower than
reading its input whatever its launch grid (bench/results/histogram_h200_launch.txt). Here every warp counts into
its own histogram in shared memory with one atomic increment per element that lands in range, the block sums its
warps' histograms and adds them to the global counts once (2x the Triton kernel's speed on an H200:
bench/results/histogram_h200_cuda.txt). It computes exactly what the Triton kernel
(``kernels._scaled_residual_histogram_kernel``) and torch compute: ``x = t / scale + zero_point`` with IEEE
division and no fused multiply-add, ``round(x) - x`` with torch.round's ties to even, torch.histc's bin; the counts
are integers, so the two kernels agree bit for bit (tests/test_kernels.py checks both against torch.histc).

The kernel is compiled once per (input dtype, per-row step, bins, device) on its first call, which is a warm-up
step outside any CUDA-graph capture (compiling during a capture is refused), by the NVRTC library that torch's CUDA
wheels carry (no CUDA toolkit needed), and loaded by torch's module loader (what ``torch.cuda._compile_kernel``
uses). Where it cannot be compiled (no NVRTC, a GPU newer than it, a torch without the loader) ``compile_histogram``
returns None, once with a warning, and the Triton kernel counts. ``HDRQ_HISTOGRAM_KERNEL`` in the environment:
``triton`` chooses the Triton kernel always, ``cuda`` the CUDA kernel or an error (``choice``).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from typing import Any

import torch
from torch import Tensor

THREADS = 256  # 8 warps, 8 private histograms of `bins` int32 (8 KiB for 256 bins) per block
MAX_ELEMENTS = 2**31 - 1  # the launcher passes Python ints as 32-bit C ints; larger tensors: the Triton kernel
BLOCKS_PER_SM = 8  # bench/histogram.py --cuda-blocks (H200: 25.5 / 83.6 us on 6.4M / 25.7M bf16; 4: 27.0 / 90.4)

_SOURCE = r"""
#define BINS {bins}
#define PER_ROW {per_row}
#define WARPS ({threads} / 32)  // one private histogram per warp
typedef {storage} storage_t;

__device__ __forceinline__ float as_float(float v) {{ return v; }}
__device__ __forceinline__ float as_float(unsigned short v) {{
#if {is_half}
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#else
    return __uint_as_float(((unsigned int)v) << 16);  // bfloat16: the upper half of a float32
#endif
}}

__device__ __forceinline__ void count(float t, long long i, const float* scale, const float* zero, float s0, float z0,
                                      int inner, float qmin, float qmax, int* h) {{
#if PER_ROW
    const int row = (int)i / inner;
    const float x = __fdiv_rn(t, scale[row]) + zero[row];
#else
    const float x = __fdiv_rn(t, s0) + z0;
#endif
    if (x > qmin && x < qmax) {{
        // round(x) - x with torch.round's half-to-even ties, every step exact
        const float below = floorf(x);
        const float half = below + 0.5f;
        const bool odd = (below * 0.5f - floorf(below * 0.5f)) != 0.0f;
        const float residual = ((x > half) || (x == half && odd) ? below + 1.0f : below) - x;
        // torch.histc's bin over [-1/2, 1/2], the upper edge in the last bin
        const int bin = min((int)((residual + 0.5f) * (float)BINS), BINS - 1);
        atomicAdd(h + bin, 1);
    }}
}}

extern "C" __global__ void __launch_bounds__({threads})
scaled_residual_histogram(const storage_t* __restrict__ t, const float* __restrict__ scale,
                          const float* __restrict__ zero, int* __restrict__ counts, int n, int inner,
                          double qmin_, double qmax_, int vectorized) {{
    __shared__ int hist[WARPS * BINS];
    for (int b = threadIdx.x; b < WARPS * BINS; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    int* h = hist + (threadIdx.x / 32) * BINS;
    const float qmin = (float)qmin_, qmax = (float)qmax_;
    const float s0 = scale[0], z0 = zero[0];
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int vec = 16 / sizeof(storage_t);
    const long long vectors = vectorized ? n / vec : 0;  // 16-byte loads where the data is 16-byte aligned
    for (long long v = first; v < vectors; v += stride) {{
        const uint4 raw = reinterpret_cast<const uint4*>(t)[v];
        const storage_t* e = reinterpret_cast<const storage_t*>(&raw);
#pragma unroll
        for (int k = 0; k < vec; ++k) count(as_float(e[k]), v * vec + k, scale, zero, s0, z0, inner, qmin, qmax, h);
    }}
    for (long long i = vectors * vec + first; i < n; i += stride)
        count(as_float(t[i]), i, scale, zero, s0, z0, inner, qmin, qmax, h);
    __syncthreads();
    for (int b = threadIdx.x; b < BINS; b += blockDim.x) {{
        int total = 0;
        for (int w = 0; w < WARPS; ++w) total += hist[w * BINS + b];
        if (total) atomicAdd(counts + b, total);
    }}
}}
"""

_STORAGE = {torch.float32: ("float", 0), torch.bfloat16: ("unsigned short", 0), torch.float16: ("unsigned short", 1)}
_compiled: dict[tuple, Any] = {}
_unavailable: list[str] = []  # why NVRTC could not compile (warned once)


def source(dtype: torch.dtype, per_row: bool, bins: int) -> str:
    """The kernel's CUDA C for ``dtype`` input (float32, bfloat16 or float16)."""
    storage, is_half = _STORAGE[dtype]
    return _SOURCE.format(bins=bins, per_row=int(per_row), threads=THREADS, storage=storage, is_half=is_half)


def supports(dtype: torch.dtype, bins: int, numel: int) -> bool:
    """Whether the kernel counts this input: a float dtype, the warps' histograms within 48 KiB of static shared
    memory (bins <= 1024), at most ``MAX_ELEMENTS`` elements."""
    return dtype in _STORAGE and bins * THREADS // 32 * 4 <= 48 * 1024 and numel <= MAX_ELEMENTS


def choice() -> str:
    """``HDRQ_HISTOGRAM_KERNEL``: "auto" (unset: the CUDA kernel where it compiles, else Triton's), "cuda" (the CUDA
    kernel or an error) or "triton"; on ROCm "auto" is Triton's."""
    value = os.environ.get("HDRQ_HISTOGRAM_KERNEL", "auto")
    if value not in ("auto", "cuda", "triton"):
        raise ValueError(f"HDRQ_HISTOGRAM_KERNEL={value!r}: use auto, cuda or triton")
    return "triton" if value == "auto" and torch.version.hip is not None else value


def compile_histogram(dtype: torch.dtype, per_row: bool, bins: int, device: torch.device) -> Any | None:
    """The compiled kernel (a ``torch.cuda._utils._CudaKernel``) for these inputs on ``device``, or None where NVRTC
    cannot compile it (warned once; the caller counts with Triton)."""
    key = (dtype, per_row, bins, device.index)
    kernel = _compiled.get(key)
    if kernel is not None or _unavailable:
        return kernel
    try:
        with torch.cuda.device(device):
            kernel = _compile(source(dtype, per_row, bins), "scaled_residual_histogram", device)
    except Exception as error:  # noqa: BLE001 - any failure means: count with Triton
        _unavailable.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"HDRQ's CUDA histogram kernel could not be compiled by NVRTC ({_unavailable[0][:300]}); the "
                      "Triton kernel counts instead (same counts, slower). Set HDRQ_HISTOGRAM_KERNEL=triton to "
                      "silence this.", stacklevel=2)
        return None
    _compiled[key] = kernel
    return kernel


def _compile(code: str, name: str, device: torch.device) -> Any:
    """``code``'s ``extern "C"`` kernel ``name`` compiled for ``device`` to a cubin by the NVRTC library torch ships
    with, loaded by torch's module loader (torch.cuda._utils: what ``torch.cuda._compile_kernel`` uses; called here
    directly because that wrapper adds the CUDA toolkit's include paths and fails where no toolkit is installed, while
    this kernel needs no header)."""
    from torch.cuda import _utils

    loader = getattr(_utils, "_get_gpu_rtc_library", None) or getattr(_utils, "_get_nvrtc_library", None)
    if loader is None or not hasattr(_utils, "_cuda_load_module"):
        raise RuntimeError(f"torch {torch.__version__} has no NVRTC loader in torch.cuda._utils")
    nvrtc = loader()
    major, minor = torch.cuda.get_device_capability(device)
    options = [f"--gpu-architecture=sm_{major}{minor}".encode(), b"--fmad=false"]
    program = ctypes.c_void_p()
    _check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), code.encode(), f"{name}.cu".encode(), 0, None,
                                           None))
    try:
        if nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options)):
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC failed to compile {name}: {log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check(nvrtc, nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin))
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return _utils._cuda_load_module(cubin.raw, [name])[name]


def _check(nvrtc: Any, result: int) -> None:
    if result:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC error {result}: {nvrtc.nvrtcGetErrorString(result)!r}")


def launch_histogram(kernel: Any, flat: Tensor, scale: Tensor, zero_point: Tensor, counts: Tensor, inner: int,
                     qmin: int, qmax: int, blocks: int) -> None:
    """Count ``flat`` (1-D, dense, at most ``MAX_ELEMENTS``) into the int32 ``counts`` with ``blocks`` blocks on the
    current stream. ``scale``/``zero_point``: float32, one value or one per run of ``inner`` elements."""
    if flat.numel() > MAX_ELEMENTS:
        raise ValueError(f"the CUDA histogram counts at most {MAX_ELEMENTS} elements, got {flat.numel()}")
    with torch.cuda.device(flat.device):  # the module was loaded in that device's context; its current stream
        kernel(grid=(blocks, 1, 1), block=(THREADS, 1, 1),
               args=[flat, scale, zero_point, counts, flat.numel(), inner, float(qmin), float(qmax),
                     int(flat.data_ptr() % 16 == 0)])
