"""Uniform affine weight and activation quantizers (BRECQ / QDrop / HDRQ numerics).

Conventions shared by every mode: ``x = t / scale + zero_point`` is the tensor on the integer grid,
codes are ``clamp(round(x), qmin, qmax)`` and the dequantized value is ``(code - zero_point) * scale``.
Modes are plain attributes mirrored in buffers, so they survive ``state_dict`` round trips; tensors whose
shape is only known after initialisation (per-channel scales, AdaRound ``alpha``) are resized on load.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.quant import kernels
from hdrq_lightning.quant.noise import (
    NOISE_DISTRIBUTIONS,
    rounding_residual_noise,
    sample_residual_histogram,
    scaled_residual_histogram,
)

MODES: tuple[str, ...] = ("float", "nearest", "adaround", "noise")
RANGE_SEARCHES: tuple[str, ...] = ("minmax", "mse")
MIN_BITS, MAX_BITS = 2, 8
_MIN_SCALE = 1e-8
# Elements processed per chunk of candidate ranges in the MSE search (bounds its memory).
_SEARCH_CHUNK_ELEMENTS = 1 << 24


def check_bits(bits: int, what: str = "bits") -> None:
    """Raise ConfigError unless ``bits`` is an integer in [MIN_BITS, MAX_BITS]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{what}={bits!r} is not supported; use an integer from {MIN_BITS} to {MAX_BITS}.")


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a ``bits``-bit grid: 0..2^b-1 unsigned, -2^(b-1)..2^(b-1)-1 signed."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def rectified_sigmoid(alpha: Tensor) -> Tensor:
    """AdaRound's soft rounding offset h(alpha) = clamp(sigmoid(alpha) * 1.2 - 0.1, 0, 1)."""
    return torch.clamp(torch.sigmoid(alpha) * 1.2 - 0.1, 0.0, 1.0)


# The straight-through and gradient-scaling estimators are written with detach() rather than as autograd.Functions:
# torch.compile's AOT-autograd cache refuses graphs with autograd.Function calls, and that cache is what makes a
# warm start skip AOT tracing (most of a unit's warm compile time).
def round_straight_through(x: Tensor) -> Tensor:
    """round(x) in the forward, identity in the backward.

    ``x + (round(x) - x)`` is exactly ``round(x)`` in float arithmetic (tested over a float32 range): for
    |x| >= 1/2, x and round(x) are within a factor of 2, so their difference is exact (Sterbenz) and adding it
    back lands on the integer; for |x| < 1/2 the difference is -x (a -0 result comes out as +0).
    """
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward (exactly: ``x - x.detach()`` is 0), gradient multiplied by ``factor`` (LSQ)."""
    detached = x.detach()
    return detached + (x - detached) * factor


@torch.library.custom_op("hdrq::keep_mask", mutates_args=())
def _keep_mask(seed: Tensor, numel: int, prob: float) -> Tensor:
    return kernels.keep_mask(seed, numel, prob)


@_keep_mask.register_fake
def _(seed: Tensor, numel: int, prob: float) -> Tensor:
    return seed.new_empty(numel, dtype=torch.bool)


def _philox_seed(device: torch.device) -> Tensor:
    """A mask kernel's seed: one draw from torch's generator (so reseeding and CUDA-graph replays govern it)."""
    return torch.randint(1 << 62, (1,), device=device)


def keep_mask(shape: tuple[int, ...], prob: float, device: torch.device, kernel: bool = False) -> Tensor:
    """Booleans of ``shape``, each true with probability ``prob``: ``torch.rand(shape) < prob``, or with ``kernel``
    on CUDA (``quant.runtime.mask_kernel``) one Triton kernel drawing four elements per Philox call and writing one
    byte each (kernels.keep_mask; its seed drawn from torch's generator, so torch.manual_seed and CUDA-graph replays
    govern it as any draw). Same distribution, other draws."""
    if not (kernel and kernels.triton is not None and device.type == "cuda"):
        return torch.rand(shape, device=device) < prob
    return _keep_mask(_philox_seed(device), math.prod(shape), float(prob)).view(shape)


def batch_keep_mask(rows: tuple[int, int, int], row_shape: tuple[int, ...], device: torch.device, prob: float,
                    kernel: bool = False) -> Tensor:
    """``keep_mask`` for rows ``start:stop`` of a global batch of ``total`` rows (``rows = (total, start, stop)``),
    each row of ``row_shape``: the global batch's mask sliced, so data-parallel ranks holding disjoint rows together
    draw exactly what one device with the whole batch draws (QDrop's input mixing and in-block drop)."""
    total, start, stop = rows
    mask = keep_mask((total, *row_shape), prob, device, kernel)
    return mask if start == 0 and stop == total else mask[start:stop]


@torch.library.custom_op("hdrq::mix_rows", mutates_args=())
def _mix_rows(quant: Tensor, fp: Tensor, index: Tensor, seed: Tensor, first_row: int, prob: float) -> Tensor:
    return kernels.mix_rows(quant, fp, index, seed, first_row, prob)


@_mix_rows.register_fake
def _(quant: Tensor, fp: Tensor, index: Tensor, seed: Tensor, first_row: int, prob: float) -> Tensor:
    return quant.new_empty_strided((index.shape[0], *quant.shape[1:]),
                                   (math.prod(quant.shape[1:]), *quant.stride()[1:]))


def mix_batch_rows(quant: Tensor, fp: Tensor, index: Tensor, rows: tuple[int, int, int], prob: float) -> Tensor:
    """QDrop's input mixing with ``quant.runtime.mask_kernel`` (sources that ``kernels.mix_rows_supported`` takes):
    rows ``index`` of ``quant`` and ``fp``, each element
    the quantized one with probability ``prob``, read straight from the sources in one kernel (kernels.mix_rows; no
    gathered copies or mask written out). ``rows = (total, start, stop)``: these are rows ``start:stop`` of the
    global batch, whose mask is drawn per global row, so data-parallel ranks draw one batch's mask together. The
    draws follow the memory order of a row (a channels-last cache mixes other elements than an NCHW one)."""
    return _mix_rows(quant, fp, index, _philox_seed(quant.device), rows[1], float(prob))


def flatten_in_memory_order(t: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``t`` as a 1-D view in the order of its memory, and the map from such a 1-D tensor back to ``t``'s layout.

    Per-tensor quantizers reduce over every element (the step's gradient, HDRQ's histogram). Inductor compiles a
    full reduction of a channels-last tensor in logical (NCHW) order, i.e. with loads strided by the channel count,
    many times slower than the same reduction over the memory-order view.
    For an NCHW-contiguous tensor the view is ``t.view(-1)``. A tensor with gaps (a strided slice) is copied.
    """
    if t.is_contiguous():  # NCHW (the eager path): no permutation to dispatch at every step
        shape = t.shape
        return t.view(-1), lambda flat: flat.view(shape)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # stable: size-1 dims keep their place
    permuted = t.permute(order)
    if not permuted.is_contiguous():
        return t.reshape(-1), lambda flat: flat.view(t.shape)
    inverse = [order.index(d) for d in range(t.dim())]
    return permuted.reshape(-1), lambda flat: flat.view(permuted.shape).permute(inverse)


def fake_quantize_nearest(t: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Round-to-nearest fake quantization with LSQ gradients (straight-through inside the clip range)."""
    x = torch.clamp(t / scale + zero_point, qmin, qmax)
    return (round_straight_through(x) - zero_point) * scale


def fake_quantize_noise(
    t: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, distribution: str,
    source: Tensor | None = None,
) -> Tensor:
    """HDRQ noise quantization: clipped elements pinned to the boundary, the others get detached noise.

    As the official code, an element on or beyond a clip boundary (``x <= qmin`` or ``x >= qmax``) counts as
    clipped: it stays exactly on the boundary (a post-ReLU zero on the unsigned grid stays 0), gets no noise and is
    left out of the residual histogram. ``((t / s + z + eps) - z) * s`` is written ``where(in range, t, 0) + s * e`` with ``e`` the noise in range and
    the clipped element's integer offset ``clamp(t / s + z) - z`` outside: the same values and gradients
    (d/dt = 1 in range, d/ds = e) without differentiating through ``t / s`` (whose step-gradient reduction
    compiles to a slow kernel), and the backward keeps one tensor ``e`` instead of the noise and the offsets.
    ``source``: ``t`` in the dtype it arrived in (bfloat16 under autocast; ``t`` is its float32 copy), which the
    histogram reads instead of ``t`` (the same values, half the bytes).
    """
    with torch.no_grad():
        x = t / scale + zero_point
        in_range = (x > qmin) & (x < qmax)
        if distribution == "histogram":
            counts = scaled_residual_histogram(t if source is None else source, scale, zero_point, qmin, qmax,
                                               scaled=(x, in_range))
            noise = sample_residual_histogram(counts, x)
        else:
            noise = rounding_residual_noise(x, distribution)
        offset = torch.where(in_range, noise, torch.clamp(x, qmin, qmax) - zero_point)
    return torch.where(in_range, t, t.new_zeros(())) + scale * offset


def _affine_from_range(
    low: Tensor, high: Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point covering [low, high] (low <= 0 <= high)."""
    if symmetric:
        scale = high / qmax if qmin == 0 else torch.maximum(high / qmax, low / qmin)
        scale = scale.clamp_min(_MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((high - low) / (qmax - qmin)).clamp_min(_MIN_SCALE)
    zero_point = torch.clamp(qmin - torch.round(low / scale), qmin, qmax)
    return scale, zero_point


def search_range(
    rows: Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    search: str = "mse",
    norm: float = 2.4,
    grid: int = 100,
) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero point of ``rows`` [C, K], vectorised over rows.

    ``"minmax"`` covers [min, max] (zero included); ``"mse"`` tries the ranges shrunk by the fractions
    1, 1 - 1/grid, ..., 1/grid and keeps per row the one with the least sum |t - fq(t)|^norm.
    """
    if search not in RANGE_SEARCHES:
        raise ConfigError(f"Unknown range search {search!r}; use one of {RANGE_SEARCHES}.")
    rows = rows.detach().float()
    low, high = rows.amin(dim=1).clamp(max=0.0), rows.amax(dim=1).clamp(min=0.0)
    best_scale, best_zero_point = _affine_from_range(low, high, qmin, qmax, symmetric)
    if search == "minmax":
        return best_scale, best_zero_point
    best_error = torch.full_like(best_scale, math.inf)
    fractions = 1.0 - torch.arange(grid, device=rows.device, dtype=rows.dtype) / grid
    chunk = max(1, _SEARCH_CHUNK_ELEMENTS // rows.numel())
    for start in range(0, grid, chunk):
        fraction = fractions[start : start + chunk, None]  # [G, 1]
        scale, zero_point = _affine_from_range(
            low * fraction, high * fraction, qmin, qmax, symmetric
        )  # [G, C]
        codes = torch.clamp(torch.round(rows / scale[..., None] + zero_point[..., None]), qmin, qmax)
        error = (rows - (codes - zero_point[..., None]) * scale[..., None]).abs().pow(norm).sum(dim=-1)
        chunk_error, index = error.min(dim=0)  # first minimum: the widest range wins ties
        better = chunk_error < best_error
        best_error = torch.where(better, chunk_error, best_error)
        best_scale = torch.where(better, scale.gather(0, index[None])[0], best_scale)
        best_zero_point = torch.where(better, zero_point.gather(0, index[None])[0], best_zero_point)
    return best_scale, best_zero_point


class _Quantizer(nn.Module):
    """Shared state: bit width, mode and noise distribution (mirrored in buffers), initialised flag."""

    allowed_modes: tuple[str, ...] = MODES
    # Tensors whose shape is set at initialisation; they are re-created with the incoming shape on load.
    resizable: tuple[str, ...] = ()

    def __init__(self, bits: int, symmetric: bool, mode: str) -> None:
        super().__init__()
        check_bits(bits)
        self.bits, self.symmetric = bits, symmetric
        self.register_buffer("mode_code", torch.tensor(MODES.index(mode), dtype=torch.int8))
        self.register_buffer("noise_code", torch.tensor(0, dtype=torch.int8))
        self.register_buffer("initialized", torch.tensor(False))
        self._mode, self._noise_distribution, self._initialized = mode, NOISE_DISTRIBUTIONS[0], False

    def _register_step(self, learn_scale: bool) -> None:
        """The step (a Parameter when learned, else a buffer) and the zero point, both scalars until initialised."""
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))

    @property
    def mode(self) -> str:
        """ "float" (bypass), "nearest" (round, straight-through), "adaround" (weights only) or "noise"."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.set_mode(mode)

    def set_mode(self, mode: str) -> None:
        """Switch the forward; every mode but "float" needs an initialised range."""
        if mode not in self.allowed_modes:
            raise ConfigError(
                f"Unknown mode {mode!r} for {type(self).__name__}; use one of {self.allowed_modes}."
            )
        if mode != "float" and not self._initialized:
            raise ConfigError(
                f"{type(self).__name__} has no range yet; call init_range (or calibrate_activations) before "
                f"setting mode {mode!r}."
            )
        if mode == self._mode:  # callers may set the mode every step: no device write when nothing changes
            return
        self._mode = mode
        self.mode_code.fill_(MODES.index(mode))

    @property
    def noise_distribution(self) -> str:
        """ "histogram" (official code: the tensor's own residuals) or "uniform" (paper: U[-1/2, 1/2])."""
        return self._noise_distribution

    @noise_distribution.setter
    def noise_distribution(self, distribution: str) -> None:
        if distribution not in NOISE_DISTRIBUTIONS:
            raise ConfigError(
                f"Unknown noise distribution {distribution!r}; use one of {NOISE_DISTRIBUTIONS}."
            )
        self._noise_distribution = distribution
        self.noise_code.fill_(NOISE_DISTRIBUTIONS.index(distribution))

    def _store(self, name: str, value: Tensor, parameter: bool) -> None:
        """Write ``value`` into tensor ``name`` in place when shapes agree (keeps optimizer references)."""
        current = getattr(self, name)
        if current is not None and current.shape == value.shape:
            with torch.no_grad():
                current.copy_(value)
        elif parameter:
            setattr(self, name, nn.Parameter(value.detach().clone()))
        else:
            setattr(self, name, value.detach().clone())

    def _mark_initialized(self) -> None:
        self._initialized = True
        self.initialized.fill_(True)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Resize lazily shaped tensors to the incoming ones, load, then re-read the mirrored attributes."""
        for name in self.resizable:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is not None and (current is None or current.shape != incoming.shape):
                empty = torch.empty(incoming.shape, dtype=incoming.dtype, device=self.mode_code.device)
                if name in self._parameters:
                    setattr(self, name, nn.Parameter(empty))
                else:
                    self.register_buffer(name, empty)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._initialized = bool(self.initialized)
        self._mode = MODES[int(self.mode_code)]
        self._noise_distribution = NOISE_DISTRIBUTIONS[int(self.noise_code)]

    def effective_scale(self) -> Tensor:
        """The step the forward uses: the scale kept away from zero."""
        return self.scale.clamp_min(_MIN_SCALE)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, qmin={self.qmin}, qmax={self.qmax}, mode={self.mode}"


class WeightQuantizer(_Quantizer):
    """Per-channel or per-tensor weight quantizer with nearest, AdaRound and HDRQ-noise forwards."""

    resizable = ("scale", "zero_point", "alpha", "hard_codes")

    def __init__(
        self,
        bits: int,
        per_channel: bool = True,
        symmetric: bool = False,
        channel_axis: int = 0,
        learn_scale: bool = False,
    ) -> None:
        super().__init__(bits, symmetric, mode="nearest")
        self.per_channel, self.channel_axis, self.learn_scale = per_channel, channel_axis, learn_scale
        self.qmin, self.qmax = integer_range(bits, signed=symmetric)
        self._register_step(learn_scale)
        self.register_parameter("alpha", None)
        self.register_buffer("hard_codes", None)

    def _rows(self, w: Tensor) -> Tensor:
        """``w`` as [channels, elements] (one row per-tensor)."""
        w = w.detach()
        return (
            w.movedim(self.channel_axis, 0).reshape(w.shape[self.channel_axis], -1)
            if self.per_channel
            else w.reshape(1, -1)
        )

    def range_shape(self, w: Tensor) -> list[int]:
        """The shape of the step and zero point for weight ``w`` ([] per tensor, 1s but the channel axis)."""
        if not self.per_channel:
            return []
        shape = [1] * w.dim()
        shape[self.channel_axis] = w.shape[self.channel_axis]
        return shape

    def set_range(self, scale: Tensor, zero_point: Tensor) -> None:
        """Install a scale and (integer-valued) zero point of the quantizer's shape; marks it initialised."""
        self._store("scale", scale.to(torch.float32), parameter=self.learn_scale)
        self._store("zero_point", zero_point.to(torch.float32), parameter=False)
        self._mark_initialized()

    def init_range(self, w: Tensor, search: str = "mse", norm: float = 2.4, grid: int = 100) -> None:
        """Set the range from ``w`` by min-max or by the per-channel L^norm search (see search_range)."""
        scale, zero_point = search_range(
            self._rows(w), self.qmin, self.qmax, self.symmetric, search, norm, grid
        )
        shape = self.range_shape(w)
        self.set_range(scale.reshape(shape), zero_point.reshape(shape))

    def set_mode(self, mode: str) -> None:
        if mode == "adaround" and self.alpha is None:
            raise ConfigError("AdaRound mode needs rounding variables; call init_adaround(weight) first.")
        super().set_mode(mode)

    def init_adaround(self, w: Tensor) -> None:
        """Create ``alpha`` with h(alpha) equal to frac(w / scale), i.e. the soft rounding starts at w."""
        if not self._initialized:
            raise ConfigError("Call init_range before init_adaround: AdaRound rounds on an existing grid.")
        with torch.no_grad():
            x = w.detach() / self.effective_scale()
            offset = ((x - torch.floor(x)) + 0.1) / 1.2
            self.alpha = nn.Parameter(torch.logit(offset))
        self.hard_codes = None

    def adaround_regularizer(self, beta: float | Tensor) -> Tensor:
        """AdaRound's rounding regulariser sum(1 - |2h - 1|^beta), pushing h to 0 or 1."""
        if self.alpha is None:
            raise ConfigError("The AdaRound regulariser needs rounding variables; call init_adaround first.")
        return (1 - (2 * rectified_sigmoid(self.alpha) - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self, w: Tensor) -> None:
        """Fix the rounding of ``w`` to floor + (alpha >= 0); "adaround" mode then uses these codes."""
        if self.alpha is None:
            raise ConfigError("Nothing to harden; call init_adaround and train alpha first.")
        self.hard_codes = self._hard_adaround_codes(w)

    def _hard_adaround_codes(self, w: Tensor) -> Tensor:
        floor = torch.floor(w.detach() / self.effective_scale())
        return torch.clamp(floor + (self.alpha >= 0).to(floor.dtype) + self.zero_point, self.qmin, self.qmax)

    def _check_ready(self) -> None:
        if not self._initialized:
            raise ConfigError("WeightQuantizer has no range yet; call init_range(weight) before the forward.")

    def forward(self, w: Tensor) -> Tensor:
        """Fake-quantized (dequantized float) weight of the same shape, per the current mode."""
        if self._mode == "float":
            return w
        self._check_ready()
        scale = self.effective_scale()
        if self._mode == "nearest":
            return fake_quantize_nearest(w, scale, self.zero_point, self.qmin, self.qmax)
        if self._mode == "noise":
            return fake_quantize_noise(
                w, scale, self.zero_point, self.qmin, self.qmax, self._noise_distribution
            )
        if self.hard_codes is not None:
            return (self.hard_codes - self.zero_point) * scale
        floor = torch.floor(w.detach() / scale)
        codes = torch.clamp(floor + rectified_sigmoid(self.alpha) + self.zero_point, self.qmin, self.qmax)
        return (codes - self.zero_point) * scale

    @torch.no_grad()
    def integer(self, w: Tensor) -> Tensor:
        """int32 codes of the deterministic forward: hard AdaRound in "adaround" mode, else nearest."""
        self._check_ready()
        if self._mode == "adaround":
            codes = self.hard_codes if self.hard_codes is not None else self._hard_adaround_codes(w)
        else:
            codes = torch.clamp(
                torch.round(w / self.effective_scale() + self.zero_point), self.qmin, self.qmax
            )
        return codes.to(torch.int32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_channel={self.per_channel}, learn_scale={self.learn_scale}"


class ActivationQuantizer(_Quantizer):
    """Per-tensor activation quantizer with an LSQ step, QDrop element dropping and HDRQ noise.

    The grid is unsigned when the calibration data is non-negative (after ReLU), signed otherwise.
    """

    allowed_modes = ("float", "nearest", "noise")

    def __init__(self, bits: int, symmetric: bool = False, learn_scale: bool = True) -> None:
        super().__init__(bits, symmetric, mode="float")
        self.learn_scale = learn_scale
        self.drop_prob: float = 0.0
        self.batch_rows: tuple[int, int, int] | None = None  # (global batch, first row, end row) of the input
        self.mask_kernel = False  # drop masks by kernels.keep_mask on CUDA (quant.runtime.mask_kernel)
        self.register_buffer("signed", torch.tensor(False))
        self.qmin, self.qmax = integer_range(bits, signed=False)
        self._register_step(learn_scale)

    def set_drop(self, prob: float, batch_rows: tuple[int, int, int] | None = None, kernel: bool = False) -> None:
        """QDrop's in-block drop: each element keeps its float value with probability ``prob`` (0: off). The drop
        acts in training mode, which this sets too (the model around it may stay in eval mode, as under a
        Trainer); ``batch_rows``: see ``batch_keep_mask``; ``kernel``: see ``keep_mask``."""
        self.drop_prob, self.batch_rows = prob, batch_rows if prob > 0 else None
        self.mask_kernel = kernel
        self.train(prob > 0)

    def set_range(self, scale: Tensor, zero_point: Tensor, signed: bool) -> None:
        """Install a scalar step, integer-valued zero point and grid signedness; marks it initialised."""
        self.qmin, self.qmax = integer_range(self.bits, signed)
        self.signed.fill_(signed)
        self._store("scale", scale.reshape(()).to(torch.float32), parameter=self.learn_scale)
        self._store("zero_point", zero_point.reshape(()).to(torch.float32), parameter=False)
        self._mark_initialized()

    def init_range(self, x: Tensor, search: str = "mse", norm: float = 2.4, grid: int = 100) -> None:
        """Choose the grid signedness from min(x) and the step by min-max or the L^norm search."""
        signed = bool(x.min() < 0)
        qmin, qmax = integer_range(self.bits, signed)
        scale, zero_point = search_range(x.reshape(1, -1), qmin, qmax, self.symmetric, search, norm, grid)
        self.set_range(scale, zero_point, signed)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.qmin, self.qmax = integer_range(self.bits, bool(self.signed))

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantized activation; in training mode each element stays float with prob ``drop_prob``."""
        if self._mode == "float":
            return x
        if not self._initialized:
            raise ConfigError("ActivationQuantizer is not calibrated; run calibrate_activations first.")
        scale = scale_gradient(self.effective_scale(), 1.0 / math.sqrt(x.numel() * self.qmax))
        # Grid arithmetic in float32 also under bf16 autocast (bf16 cannot tell 8-bit codes apart above 128).
        # on the memory-order view: the reductions over all elements read memory contiguously (and HDRQ's noise
        # is drawn per element in memory order)
        # (an NCHW-contiguous input, as on the eager path, is used as it is: the same order, two dispatches fewer)
        given, restore = (x, None) if x.is_contiguous() else flatten_in_memory_order(x)
        flat = given if given.dtype == torch.float32 else given.float()
        if self._mode == "nearest":
            quantized = fake_quantize_nearest(flat, scale, self.zero_point, self.qmin, self.qmax)
        else:
            quantized = fake_quantize_noise(
                flat, scale, self.zero_point, self.qmin, self.qmax, self._noise_distribution, source=given
            )
        if self.training and self.drop_prob > 0:
            # QDrop: each element keeps its float value with probability drop_prob; drawn on the memory-order view
            # like the noise (one fused kernel; channels-last and NCHW runs drop different, equally likely elements)
            quantized = torch.where(self._drop_mask(flat), flat, quantized)
        restored = quantized if restore is None else restore(quantized)
        return restored if restored.dtype == x.dtype else restored.to(x.dtype)

    def _drop_mask(self, flat: Tensor) -> Tensor:
        """Where each element of the memory-order view (or of a contiguous input, in the same order) keeps its float
        value: one draw per element; with ``batch_rows`` the global batch's draw (the batch is the outermost dim in
        memory, NCHW or channels-last, so a row is a contiguous run of the view)."""
        if self.batch_rows is None:
            return keep_mask(tuple(flat.shape), self.drop_prob, flat.device, self.mask_kernel)
        _, start, stop = self.batch_rows
        if flat.dim() > 1 and flat.shape[0] == stop - start:  # a contiguous input: its rows are the batch's
            return batch_keep_mask(self.batch_rows, tuple(flat.shape[1:]), flat.device, self.drop_prob,
                                   self.mask_kernel)
        return batch_keep_mask(self.batch_rows, (flat.numel() // (stop - start),), flat.device, self.drop_prob,
                               self.mask_kernel).reshape(flat.shape)
