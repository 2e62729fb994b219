"""Weight / activation quantizers and HDRQ noise, each checked against an independent computation."""

import itertools
import math

import pytest
import torch
from scipy import stats

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.quant.noise import residual_histogram, rounding_residual_noise
from hdrq_lightning.quant.quantizers import (
    ActivationQuantizer,
    WeightQuantizer,
    batch_keep_mask,
    fake_quantize_noise,
    flatten_in_memory_order,
    keep_mask,
    round_straight_through,
    scale_gradient,
)

torch.set_num_threads(1)


def _grid(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _assert_on_grid(
    values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> None:
    codes = values / scale + zero_point
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax


def _lp_error(w: torch.Tensor, fake: torch.Tensor, norm: float = 2.4) -> torch.Tensor:
    return (w - fake).abs().pow(norm).flatten(1).sum(1)


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_outside_2_to_8_raise(bits: int) -> None:
    with pytest.raises(ConfigError):
        WeightQuantizer(bits)
    with pytest.raises(ConfigError):
        ActivationQuantizer(bits)


@pytest.mark.parametrize(
    ("bits", "per_channel", "symmetric"), itertools.product(range(2, 9), [True, False], [True, False])
)
def test_weight_fake_quant_is_on_grid(bits: int, per_channel: bool, symmetric: bool) -> None:
    torch.manual_seed(bits)
    w = torch.randn(6, 3, 3, 3) * torch.rand(6, 1, 1, 1) + 0.1
    quantizer = WeightQuantizer(bits, per_channel=per_channel, symmetric=symmetric)
    quantizer.init_range(w)
    assert (quantizer.qmin, quantizer.qmax) == _grid(bits, signed=symmetric)
    assert quantizer.scale.shape == ((6, 1, 1, 1) if per_channel else ())
    if symmetric:
        assert torch.all(quantizer.zero_point == 0)
    _assert_on_grid(quantizer(w), quantizer.scale, quantizer.zero_point, quantizer.qmin, quantizer.qmax)


@pytest.mark.parametrize(
    ("bits", "symmetric", "nonnegative"), itertools.product(range(2, 9), [True, False], [True, False])
)
def test_activation_fake_quant_is_on_grid(bits: int, symmetric: bool, nonnegative: bool) -> None:
    torch.manual_seed(bits)
    x = torch.randn(4, 5, 6)
    x = x.relu() if nonnegative else x
    quantizer = ActivationQuantizer(bits, symmetric=symmetric)
    quantizer.init_range(x)
    quantizer.set_mode("nearest")
    assert (quantizer.qmin, quantizer.qmax) == _grid(bits, signed=not nonnegative)
    _assert_on_grid(quantizer(x), quantizer.scale, quantizer.zero_point, quantizer.qmin, quantizer.qmax)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_init_is_no_worse_than_minmax(symmetric: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 40) * torch.rand(8, 1) + torch.randn(8, 1) * 0.1
    w[0, 0] = 6.0  # an outlier that min-max pays for
    errors = {}
    for search in ("minmax", "mse"):
        quantizer = WeightQuantizer(3, symmetric=symmetric)
        quantizer.init_range(w, search=search)
        errors[search] = _lp_error(w, quantizer(w))
    assert torch.all(errors["mse"] <= errors["minmax"] * (1 + 1e-6))
    assert errors["mse"].sum() < errors["minmax"].sum()


def _brute_force_range(
    row: torch.Tensor, qmin: int, qmax: int, grid: int, norm: float
) -> tuple[float, float]:
    """Scale and zero point of one asymmetric channel by looping over the candidate fractions."""
    low, high = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
    best = (math.inf, 0.0, 0.0)
    for step in range(grid):
        fraction = 1.0 - step / grid
        scale = torch.tensor((high - low) * fraction / (qmax - qmin)).clamp_min(1e-8)
        zero_point = torch.clamp(qmin - torch.round(low * fraction / scale), qmin, qmax)
        fake = (torch.clamp(torch.round(row / scale + zero_point), qmin, qmax) - zero_point) * scale
        error = (row - fake).abs().pow(norm).sum().item()
        if error < best[0]:
            best = (error, scale.item(), zero_point.item())
    return best[1], best[2]


def test_vectorised_mse_search_equals_per_channel_loop() -> None:
    torch.manual_seed(1)
    w = torch.randn(5, 2, 3, 3) * torch.rand(5, 1, 1, 1) + torch.randn(5, 1, 1, 1) * 0.3
    quantizer = WeightQuantizer(4, per_channel=True)
    quantizer.init_range(w, search="mse", grid=50)
    for channel in range(5):
        scale, zero_point = _brute_force_range(w[channel].flatten(), 0, 15, grid=50, norm=2.4)
        assert quantizer.scale[channel].item() == pytest.approx(scale, rel=1e-6)
        assert quantizer.zero_point[channel].item() == zero_point


def test_straight_through_round_is_bit_exact_round_with_identity_gradient() -> None:
    """x + (round(x) - x).detach() is round(x) to the bit: random floats over 2^-30..2^30 of both signs, the
    neighbours of every half-integer up to 2^12 (ties: half to even), signed zeros and huge values (only the
    sign of a zero result may differ)."""
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.exp2(torch.empty(2_000_000).uniform_(-30, 30, generator=g))
    signs = torch.where(torch.rand(magnitudes.shape, generator=g) < 0.5, -1.0, 1.0)
    halves = torch.arange(-(1 << 12), 1 << 12, dtype=torch.float32) + 0.5
    x = torch.cat([magnitudes * signs, halves, torch.nextafter(halves, halves + 1), torch.nextafter(halves, halves - 1),
                   torch.tensor([0.0, -0.0, 2.0**23 + 1, -(2.0**24), 3e38])]).requires_grad_()
    y, rounded = round_straight_through(x).detach(), torch.round(x.detach())
    assert torch.equal(y, rounded)  # equal values; a -0 may come out as +0 (equal as numbers)
    nonzero = rounded != 0
    assert torch.equal(y[nonzero].view(torch.int32), rounded[nonzero].view(torch.int32))  # bit for bit
    y = round_straight_through(x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_scale_gradient_is_identity_forward_and_scales_the_gradient() -> None:
    x = torch.tensor([0.3, -1e-7, 123.456, 1e30], requires_grad=True)
    y = scale_gradient(x, 0.125)
    assert torch.equal(y.detach(), x.detach())
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(x.grad, torch.tensor([0.125, 0.25, 0.375, 0.5]))


def test_lsq_weight_scale_gradient_matches_formula() -> None:
    scale, zero_point, qmin, qmax = 0.5, 2.0, 0, 7  # 3-bit asymmetric
    w = torch.tensor([-2.0, -0.26, 0.1, 0.74, 1.6, 4.0], requires_grad=True)
    quantizer = WeightQuantizer(3, per_channel=False, learn_scale=True)
    quantizer.set_range(torch.tensor(scale), torch.tensor(zero_point))
    quantizer(w).sum().backward()
    expected_scale_grad, expected_w_grad = 0.0, []
    for value in w.tolist():
        x = value / scale + zero_point
        if x < qmin:
            expected_scale_grad += qmin - zero_point
            expected_w_grad.append(0.0)
        elif x > qmax:
            expected_scale_grad += qmax - zero_point
            expected_w_grad.append(0.0)
        else:
            expected_scale_grad += round(x) - x
            expected_w_grad.append(1.0)
    assert quantizer.scale.grad.item() == pytest.approx(expected_scale_grad, abs=1e-5)
    torch.testing.assert_close(w.grad, torch.tensor(expected_w_grad))


def test_lsq_activation_step_gradient_is_scaled() -> None:
    quantizer = ActivationQuantizer(4)
    quantizer.set_range(torch.tensor(0.25), torch.tensor(0.0), signed=False)
    quantizer.set_mode("nearest")
    x = torch.tensor([[0.0, 0.3, 0.61], [1.9, 3.5, 5.0]])
    quantizer(x).sum().backward()
    raw = sum((15.0 if v / 0.25 > 15 else round(v / 0.25) - v / 0.25) for v in x.flatten().tolist())
    assert quantizer.scale.grad.item() == pytest.approx(raw / math.sqrt(x.numel() * 15), abs=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided_slice", "scalar"])
def test_memory_order_view_is_a_view_in_memory_order_and_restores_the_layout(layout: str) -> None:
    base = torch.randn(2, 3, 4, 5)
    t = {"nchw": base, "channels_last": base.contiguous(memory_format=torch.channels_last),
         "strided_slice": base[:, ::2], "scalar": torch.tensor(1.5)}[layout]
    flat, restore = flatten_in_memory_order(t)
    assert flat.dim() == 1 and flat.numel() == t.numel()
    restored = restore(flat * 2)
    torch.testing.assert_close(restored, t * 2, rtol=0, atol=0)
    if layout != "strided_slice":  # dense: a view whose order is the storage's
        assert flat.data_ptr() == t.data_ptr() and restored.stride() == t.stride()
        torch.testing.assert_close(flat, t.as_strided((t.numel(),), (1,)), rtol=0, atol=0)


def test_activation_quantizer_is_layout_independent_in_nearest_mode() -> None:
    """Channels-last input: the same output, input gradient and step gradient as NCHW (the quantizer reduces
    over its memory-order view)."""
    torch.manual_seed(9)
    x = torch.randn(2, 8, 5, 5).relu()
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        quantizer = ActivationQuantizer(4)
        quantizer.init_range(x, search="minmax")
        quantizer.set_mode("nearest")
        inp = x.clone().contiguous(memory_format=layout).requires_grad_()
        out = quantizer(inp)
        assert out.is_contiguous(memory_format=layout)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), inp.grad, quantizer.scale.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_adaround_init_harden_and_regularizer() -> None:
    torch.manual_seed(2)
    w = torch.randn(4, 3, 2, 2)
    quantizer = WeightQuantizer(4)
    quantizer.init_range(w)
    quantizer.init_adaround(w)
    x = w / quantizer.scale
    h = torch.clamp(torch.sigmoid(quantizer.alpha) * 1.2 - 0.1, 0, 1)
    torch.testing.assert_close(h, x - torch.floor(x), atol=1e-5, rtol=0)

    with torch.no_grad():
        quantizer.alpha.copy_(torch.randn_like(w) * 3)
    quantizer.set_mode("adaround")
    hard = torch.clamp(torch.floor(x) + (quantizer.alpha >= 0).float() + quantizer.zero_point, 0, 15)
    quantizer.harden(w)
    assert torch.equal(quantizer.integer(w), hard.int())
    torch.testing.assert_close(quantizer(w), (hard - quantizer.zero_point) * quantizer.scale)

    with torch.no_grad():
        quantizer.alpha.copy_(torch.tensor([10.0, -10.0, 0.0]).repeat(16)[: w.numel()].view_as(w))
    middle = (quantizer.alpha == 0).sum().item()  # h(0) = 0.5 costs 1 each; h in {0, 1} costs 0
    assert quantizer.adaround_regularizer(20.0).item() == pytest.approx(middle)


def _noise_setup(
    distribution: str, residuals: torch.Tensor
) -> tuple[WeightQuantizer, torch.Tensor, torch.Tensor]:
    """A per-tensor 4-bit quantizer (step 0.1, zero point 3) and weights with the given residuals + clipped ones."""
    quantizer = WeightQuantizer(4, per_channel=False)
    quantizer.set_range(torch.tensor(0.1), torch.tensor(3.0))
    quantizer.noise_distribution = distribution
    levels = torch.randint(1, 15, residuals.shape).float()
    w = (
        (torch.cat([levels + residuals, torch.tensor([-4.0, -1.0, 17.0, 30.0])]) - 3.0) * 0.1
    ).requires_grad_()
    return quantizer, w, w.detach() / 0.1 + 3.0


@pytest.mark.parametrize("distribution", ["histogram", "uniform"])
def test_noise_matches_residual_distribution_and_pins_clipped(distribution: str) -> None:
    torch.manual_seed(3)
    n = 20000
    skewed = 0.5 * (torch.rand(n) ** 2) * torch.where(torch.rand(n) < 0.8, 1.0, -1.0)  # non-uniform residuals
    quantizer, w, x = _noise_setup(distribution, skewed)
    quantizer.set_mode("noise")
    out = quantizer(w)
    in_range = (x > 0) & (x < 15)
    noise = (out.detach() / 0.1 + 3.0 - x)[in_range]
    residuals = (torch.round(x) - x)[in_range]  # the official code's (x_dequant - x) / s
    if distribution == "histogram":
        # Same distribution up to the 256-bin resolution: equal bin frequencies (two-sample chi-square) ...
        observed = torch.histc(noise, 256, -0.5, 0.5)
        expected = torch.histc(residuals, 256, -0.5, 0.5)
        occupied = (observed + expected) >= 10
        table = torch.stack([observed[occupied], expected[occupied]]).numpy()
        assert stats.chi2_contingency(table).pvalue > 1e-3
        # ... and CDFs that differ by no more than the within-bin mass of this very skewed density.
        assert stats.ks_2samp(noise.numpy(), residuals.numpy()).statistic < 0.03
        assert noise.mean().item() == pytest.approx(residuals.mean().item(), abs=0.01)
    else:
        assert stats.kstest(noise.numpy(), stats.uniform(loc=-0.5, scale=1).cdf).pvalue > 1e-3
        assert abs(noise.mean().item()) < 0.01
    low, high = (torch.tensor(0.0) - 3.0) * 0.1, (torch.tensor(15.0) - 3.0) * 0.1
    assert torch.equal(out[~in_range], torch.stack([low, low, high, high]))
    out.sum().backward()
    assert torch.equal(w.grad, in_range.float())

    quantizer.set_mode("nearest")
    direct = (torch.clamp(torch.round(w / 0.1 + 3.0), 0, 15) - 3.0) * 0.1
    torch.testing.assert_close(quantizer(w), direct, atol=0, rtol=0)


def _official_noise(x: torch.Tensor, qmin: int, qmax: int, generator: torch.Generator) -> torch.Tensor:
    """An independent transcription of the official HDRQ noise: a 256-bin histogram over [-1/2, 1/2] of
    ``round(x) - x`` (the dequantization error over the step) of the elements strictly inside (qmin, qmax),
    multinomial bin draws and uniform jitter inside the bin; elements on or beyond a boundary get no noise."""
    inside = (x > qmin) & (x < qmax)
    counts = torch.histc((torch.round(x) - x)[inside], 256, -0.5, 0.5).double()
    bins = torch.multinomial(counts / counts.sum(), int(inside.sum()), replacement=True, generator=generator)
    eps = (bins.double() + torch.rand(len(bins), generator=generator, dtype=torch.float64)) / 256 - 0.5
    noise = torch.zeros_like(x, dtype=torch.float64)
    noise[inside] = eps
    return noise


def test_noise_of_skewed_residuals_follows_the_rounding_error_not_its_mirror() -> None:
    """80% of the residuals x - round(x) are positive: the rounding error round(x) - x, and so the official noise,
    has a negative mean. The project's noise must match the official draw in distribution (two-sample KS, mean),
    and differ clearly from the mirror image x - round(x)."""
    torch.manual_seed(12)
    n = 40_000
    offsets = 0.45 * torch.rand(n) * torch.where(torch.rand(n) < 0.8, 1.0, -1.0)  # x - round(x): 80% positive
    x = (torch.randint(1, 14, (n,)).float() + offsets).double()  # strictly inside the 4-bit grid [0, 15]
    ours = (fake_quantize_noise(x, torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64),
                                0, 15, "histogram") - x)
    official = _official_noise(x, 0, 15, torch.Generator().manual_seed(1))
    rounding_error = torch.round(x) - x
    assert rounding_error.mean().item() < -0.07  # the construction: the skew
    assert ours.mean().item() == pytest.approx(rounding_error.mean().item(), abs=0.01)
    assert ours.mean().item() == pytest.approx(official.mean().item(), abs=0.01)
    assert stats.ks_2samp(ours.numpy(), official.numpy()).statistic < 0.02
    assert stats.ks_2samp(ours.numpy(), (-rounding_error).numpy()).statistic > 0.5  # far from the mirror


@pytest.mark.parametrize("distribution", ["histogram", "uniform"])
def test_post_relu_zeros_stay_on_the_grid_under_noise(distribution: str) -> None:
    """After a ReLU, about half of a tensor is exactly 0, the lowest code of the unsigned grid: as in the official
    code those zeros are clipped elements, pinned (exactly 0, never below the grid) and left out of the histogram,
    so the noise draws do not pile up in the centre bin."""
    torch.manual_seed(13)
    quantizer = ActivationQuantizer(4)
    quantizer.set_range(torch.tensor(0.25), torch.tensor(0.0), signed=False)
    quantizer.noise_distribution = distribution
    quantizer.set_mode("noise")
    t = torch.relu(torch.randn(20_000)) * 1.5
    zeros = t == 0
    assert 0.4 < zeros.float().mean() < 0.6
    out = quantizer(t)
    assert torch.equal(out[zeros], torch.zeros(int(zeros.sum())))  # pinned, not moved off 0
    x = t / 0.25
    # nothing below the grid but elements within half a step of 0, which noise may move by up to half a step
    assert torch.all(x[out < 0] < 0.5) and out.min().item() >= -0.5 * 0.25
    inside = (x > 0) & (x < 15)
    noise = (out / 0.25 - x)[inside]
    # the inside elements' residuals are spread: no hot centre bin in their noise either
    centre = ((noise > -0.5 / 256) & (noise < 0.5 / 256)).float().mean().item()
    assert centre < 0.02


def test_histogram_noise_of_gaussian_weights_has_zero_mean() -> None:
    torch.manual_seed(4)
    x = torch.randn(50000) * 3
    noise = rounding_residual_noise(x, "histogram")
    assert abs(noise.mean().item()) < 0.01
    assert noise.abs().max().item() <= 0.5


def test_noise_histogram_uses_only_masked_elements() -> None:
    torch.manual_seed(5)
    inside = torch.arange(100).float() + 0.2 + 0.1 * torch.rand(100)  # rounding errors in [-0.3, -0.2]
    outside = torch.arange(100).float() - 0.45  # rounding errors +0.45, masked out
    x = torch.cat([inside, outside])
    mask = torch.cat([torch.ones(100, dtype=torch.bool), torch.zeros(100, dtype=torch.bool)])
    noise = rounding_residual_noise(x, "histogram", mask=mask)
    assert noise.shape == x.shape
    assert noise.min().item() >= -0.3 - 1 / 256 and noise.max().item() <= -0.2 + 1 / 256


def test_histogram_noise_is_uniform_inside_its_bin() -> None:
    """Residuals all in one bin: the noise fills that bin uniformly, at the resolution of float32 arithmetic on
    [-1/2, 1/2] (2^16 values per bin: 100k draws hit about 51k of them; a coarse jitter would hit far fewer)."""
    torch.manual_seed(8)
    x = torch.arange(100_000) % 7 - 0.201  # rounding error 0.201: bin 179, [0.19921875, 0.203125)
    noise = rounding_residual_noise(x, "histogram").double()
    low, width = 179 / 256 - 0.5, 1 / 256
    assert noise.min() >= low and noise.max() < low + width
    assert stats.kstest(((noise - low) / width).numpy(), "uniform").pvalue > 1e-3
    assert noise.unique().numel() > 45_000


def test_activation_noise_pins_clipped_and_drop_keeps_float() -> None:
    torch.manual_seed(6)
    quantizer = ActivationQuantizer(4)
    quantizer.set_range(torch.tensor(0.2), torch.tensor(0.0), signed=False)
    x = torch.rand(4000) * 2.9 + 0.05  # on [0.05, 2.95]: inside the grid [0, 3]
    x[:10] = 10.0
    quantizer.set_mode("noise")
    assert torch.all(quantizer(x)[:10] == 3.0)

    quantizer.set_mode("nearest")
    quantized = quantizer(x)
    quantizer.set_drop(0.5)
    kept_float = (quantizer(x) == x) & (quantized != x)
    assert kept_float.float().sum().item() / (quantized != x).sum().item() == pytest.approx(0.5, abs=0.05)
    quantizer.eval()  # no drop in eval mode, and none once set off
    assert torch.equal(quantizer(x), quantized)
    quantizer.set_drop(0.0)
    assert torch.equal(quantizer(x), quantized) and not quantizer.training


def test_state_dict_round_trip_restores_modes_and_shapes() -> None:
    torch.manual_seed(7)
    w = torch.randn(3, 2, 2, 2)
    source = WeightQuantizer(3, learn_scale=True)
    source.init_range(w)
    source.init_adaround(w)
    source.harden(w)
    source.set_mode("adaround")
    source.noise_distribution = "uniform"
    target = WeightQuantizer(3, learn_scale=True)
    target.load_state_dict(source.state_dict())
    assert (target.mode, target.noise_distribution) == ("adaround", "uniform")
    assert isinstance(target.scale, torch.nn.Parameter) and isinstance(target.alpha, torch.nn.Parameter)
    torch.testing.assert_close(target(w), source(w), atol=0, rtol=0)

    activation = ActivationQuantizer(5)
    activation.init_range(torch.randn(100))
    activation.set_mode("noise")
    restored = ActivationQuantizer(5)
    restored.load_state_dict(activation.state_dict())
    assert (restored.mode, restored.qmin, restored.qmax) == ("noise", -16, 15)
    assert restored.scale.item() == activation.scale.item()


def test_uncalibrated_activation_refuses_quantized_mode() -> None:
    with pytest.raises(ConfigError):
        ActivationQuantizer(4).set_mode("nearest")
    with pytest.raises(ConfigError):
        WeightQuantizer(4).set_mode("adaround")


@pytest.mark.parametrize("masked", [False, True])
def test_residual_histogram_counts_like_histc_with_many_exact_zeros(masked: bool) -> None:
    """Zeros are counted apart (fast on GPUs); the counts are torch.histc's on the masked residuals."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(10_000)) * 3.7  # a ReLU output on the grid scale: half exact zeros
    x[:50] = torch.round(x[:50])  # and some other on-grid values
    mask = torch.rand(x.shape) < 0.7 if masked else torch.ones_like(x, dtype=torch.bool)
    residuals = (torch.round(x) - x)[mask]
    expected = torch.histc(residuals, 256, -0.5, 0.5)
    assert expected[128] > 1000  # the hot bin really is hot
    torch.testing.assert_close(residual_histogram(x, 256, mask if masked else None), expected, rtol=0, atol=0)


@pytest.mark.parametrize("per_channel", [False, True])
def test_noise_gradients_are_the_chain_rule_of_the_textbook_form(per_channel: bool) -> None:
    """The closed-form noise forward has the gradients of ((t / s + z + eps) - z) * s with eps held fixed."""
    torch.manual_seed(0)
    t = (torch.randn(6, 50) * 2).requires_grad_(True)
    scale = (torch.rand(6, 1) * 0.2 + 0.1 if per_channel else torch.tensor(0.17)).requires_grad_(True)
    zero_point = torch.full_like(scale, 3.0).detach()
    torch.manual_seed(1)
    out = fake_quantize_noise(t, scale, zero_point, 0, 15, "histogram")
    upstream = torch.randn_like(out)
    grad_t, grad_s = torch.autograd.grad((out * upstream).sum(), [t, scale])

    torch.manual_seed(1)
    with torch.no_grad():
        x = t / scale + zero_point
        eps = rounding_residual_noise(x, "histogram", mask=(x > 0) & (x < 15))  # the same draw
    t2, s2 = t.detach().clone().requires_grad_(True), scale.detach().clone().requires_grad_(True)
    x2 = t2 / s2 + zero_point
    textbook = (torch.where((x2 > 0) & (x2 < 15), x2 + eps, torch.clamp(x2, 0, 15)) - zero_point) * s2
    expected_t, expected_s = torch.autograd.grad((textbook * upstream).sum(), [t2, s2])
    torch.testing.assert_close(out, textbook, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_t, expected_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_s, expected_s, rtol=1e-4, atol=1e-4)


def test_drop_of_batch_slices_is_the_drop_of_the_whole_batch() -> None:
    """Two data-parallel ranks holding rows 0:2 and 2:4 of a channels-last batch (same seed) drop exactly what one
    device with the 4 rows drops, and the input mixing's masks (batch_keep_mask) slice the same way."""
    torch.manual_seed(3)
    x = torch.rand(4, 3, 5, 5).contiguous(memory_format=torch.channels_last) * 3
    quantizer = ActivationQuantizer(4)
    quantizer.set_range(torch.tensor(0.2), torch.tensor(0.0), signed=False)
    quantizer.set_mode("nearest")
    outputs = []
    for rows, part in (((4, 0, 4), x), ((4, 0, 2), x[:2]), ((4, 2, 4), x[2:])):
        quantizer.set_drop(0.5, rows)
        torch.manual_seed(11)
        outputs.append(quantizer(part))
    whole, first, second = outputs
    assert torch.equal(torch.cat([first, second]), whole)
    assert 0.3 < (whole == x).float().mean() < 0.7  # it does drop: about half the elements stay float
    torch.manual_seed(5)
    expected = torch.rand(4, 2, 3) < 0.5
    slices = []
    for rows in ((4, 0, 1), (4, 1, 4)):
        torch.manual_seed(5)
        slices.append(batch_keep_mask(rows, (2, 3), torch.device("cpu"), 0.5))
    assert torch.equal(torch.cat(slices), expected)


def test_keep_masks_without_the_kernel_are_the_torch_rand_draws():
    """Off CUDA (and with quant.runtime.mask_kernel off) QDrop's masks are ``torch.rand(...) < p`` as before, rows
    of the global batch's draw sliced: asking for the kernel on the CPU changes nothing."""
    cpu = torch.device("cpu")
    for kernel in (False, True):
        torch.manual_seed(3)
        got = keep_mask((4, 5), 0.3, cpu, kernel)
        torch.manual_seed(3)
        assert torch.equal(got, torch.rand(4, 5) < 0.3)
        torch.manual_seed(4)
        got = batch_keep_mask((8, 2, 6), (3,), cpu, 0.5, kernel)
        torch.manual_seed(4)
        assert torch.equal(got, (torch.rand(8, 3) < 0.5)[2:6])
