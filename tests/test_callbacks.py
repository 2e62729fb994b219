"""The reconstruction callbacks against closed forms and torch's own schedulers."""

import io

import pytest
import torch

from hdrq_lightning.callbacks.distance import DistanceRegularizer
from hdrq_lightning.callbacks.noise_switch import NoiseToFakeQuantSwitch
from hdrq_lightning.callbacks.schedules import warmup_cosine_factor
from hdrq_lightning.quant.recipe import NoiseRecipe


@pytest.mark.parametrize("total,warmup", [(100, 0.2), (37, 0.2), (50, 0.0)])
def test_warmup_cosine_matches_torch_sequential_lr(total, warmup):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    warm = int(round(warmup * total))
    if warm:
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warm, total_iters=warm),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warm)], milestones=[warm])
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    for iteration in range(total):
        assert warmup_cosine_factor(iteration, total, warmup) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                                                abs=1e-9)
        optimizer.step()
        scheduler.step()


def test_noise_switch_at_paper_iteration_and_scaled():
    switch = NoiseToFakeQuantSwitch(NoiseRecipe(enabled=True))
    assert NoiseRecipe().switch_iteration(20000) == 16500
    assert switch.phase_mode(16499, 20000) == "noise"
    assert switch.phase_mode(16500, 20000) == "nearest"
    # fewer iterations: the same 17.5% at the end uses fake-quant
    assert NoiseRecipe().switch_iteration(2000) == 1650
    assert NoiseRecipe().switch_iteration(400) == 330
    assert switch.state_dict() == {"fakequant_iters": 3500, "reference_iters": 20000}


def test_distance_regularizer_gradient_is_the_formula():
    g = torch.Generator().manual_seed(0)
    layers = [("a", torch.nn.Linear(4, 3)), ("b", torch.nn.Conv2d(2, 3, 3))]
    source = {f"{name}.weight": layer.weight.detach() + torch.randn(layer.weight.shape, generator=g)
              for name, layer in layers}
    reg = DistanceRegularizer(source, weight=0.05)
    penalty = reg.penalty(layers)
    penalty.backward()
    expected_value = 0.0
    for name, layer in layers:
        diff = layer.weight.detach() - source[f"{name}.weight"]
        norm = diff.pow(2).sum().sqrt()
        expected_value += 0.05 * norm.item()
        # d/dW lambda ||W - S||_F = lambda (W - S) / ||W - S||_F
        torch.testing.assert_close(layer.weight.grad, 0.05 * diff / norm)
    assert penalty.item() == pytest.approx(expected_value, rel=1e-6)


def test_distance_regularizer_ignores_unknown_layers_and_zero_weight():
    layer = torch.nn.Linear(2, 2)
    assert DistanceRegularizer({}, 0.05).penalty([("x", layer)]) is None
    assert DistanceRegularizer({"x.weight": layer.weight.detach()}, 0.0).penalty([("x", layer)]) is None


def test_distance_regularizer_pickles_as_its_settings_only():
    """Its loss term is sent to the compile-ahead worker; Lightning's log methods attached to it must not follow."""
    layer = torch.nn.Linear(2, 2)
    reg = DistanceRegularizer({"x.weight": layer.weight.detach() + 1}, 0.05)
    reg.log = lambda *args: None  # what a Trainer attaches (a bound method of the LightningModule)
    buffer = io.BytesIO()
    torch.save(reg.penalty, buffer)
    buffer.seek(0)
    penalty = torch.load(buffer, weights_only=False)
    assert not hasattr(penalty.__self__, "log")
    assert penalty([("x", layer)]).item() == pytest.approx(reg.penalty([("x", layer)]).item())
