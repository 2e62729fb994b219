"""quantize_model, calibration and the integer checkpoint round trip."""

from pathlib import Path

import pytest
import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import nn
from torch.nn.utils import parametrizations

from hdrq_lightning.errors import ArtifactError, ConfigError
from hdrq_lightning.quant import (
    QUANT_MODULE_REGISTRY,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantReLU,
    activation_quantizers,
    calibrate_activations,
    export_integer_state,
    fold_batch_norm,
    load_integer_file,
    load_integer_state,
    quant_layers,
    quantize_model,
    register_quant_module,
    save_integer_state,
    set_quant_mode,
    weight_quantizers,
)

torch.set_num_threads(1)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), num_classes=5)
    for module in model.modules():  # non-trivial BN so that folding matters
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0, 0.1)
    return fold_batch_norm(model)


class _ShotNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.bottleneck = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.classifier = parametrizations.weight_norm(nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(self.bottleneck(self.backbone(x))))


def _batches(count: int = 2, size: int = 4, shape: tuple[int, ...] = (3, 32, 32)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(size, *shape, generator=generator) for _ in range(count)]


def _count(model: nn.Module, types: tuple[type, ...]) -> int:
    return sum(type(module) in types for module in model.modules())


def test_quantize_model_swaps_modules_and_applies_first_last_rule() -> None:
    folded = _resnet()
    quantized = quantize_model(folded, QuantConfig(w_bits=4, a_bits=4))
    assert _count(quantized, (nn.Conv2d, nn.Linear, nn.ReLU)) == 0
    assert _count(quantized, (QuantConv2d, QuantLinear)) == _count(folded, (nn.Conv2d, nn.Linear))
    assert _count(quantized, (QuantReLU,)) == _count(folded, (nn.ReLU,))
    bits = {name: quantizer.bits for name, quantizer in weight_quantizers(quantized)}
    assert bits.pop("conv1.weight_quantizer") == 8 and bits.pop("fc.weight_quantizer") == 8
    assert set(bits.values()) == {4}
    act_bits = {name: quantizer.bits for name, quantizer in activation_quantizers(quantized)}
    assert act_bits.pop("layer4.0.act2.output_quantizer") == 8  # produces the classifier's input
    assert set(act_bits.values()) == {4}
    assert quantized.conv1.output_quantizer is None  # nothing quantizes the image or conv outputs by default
    for _, quantizer in activation_quantizers(quantized):
        assert not bool(quantizer.initialized) and quantizer.mode == "float"
    assert type(folded.conv1) is nn.Conv2d, "the float model must be left untouched"


def test_quantize_model_skip_and_output_quant_layers_on_shot_head() -> None:
    torch.manual_seed(0)
    folded = fold_batch_norm(_ShotNet())
    quantized = quantize_model(folded, QuantConfig(output_quant_layers=("bottleneck",), skip=("backbone.1",)))
    assert type(quantized.backbone[1]) is nn.ReLU
    assert quantized.bottleneck.output_quantizer.bits == 8  # feeds the last layer
    assert quantized.classifier.weight_quantizer.bits == 8
    assert quantized.backbone[0].weight_quantizer.bits == 8  # first layer
    with pytest.raises(ConfigError, match="no_such_layer"):
        quantize_model(folded, QuantConfig(skip=("no_such_layer",)))


def test_eight_bit_model_is_close_to_float() -> None:
    folded = _resnet().eval()
    quantized = quantize_model(folded, QuantConfig(w_bits=8, a_bits=8))
    calibrate_activations(quantized, _batches())
    assert all(quantizer.mode == "nearest" for _, quantizer in activation_quantizers(quantized))
    x = _batches(1)[0]
    with torch.no_grad():
        expected, actual = folded(x), quantized(x)
    assert (actual - expected).norm() / expected.norm() < 0.05
    set_quant_mode(quantized, weight="float", activation="float")
    with torch.no_grad():
        torch.testing.assert_close(quantized(x), expected)


def test_calibrate_single_block_keeps_exact_extremes_with_small_sample() -> None:
    quantized = quantize_model(_resnet(), QuantConfig())
    block = quantized.layer1[0]
    inputs = [torch.randn(2, 64, 8, 8), torch.randn(2, 64, 8, 8)]
    calibrate_activations(block, inputs, search="minmax", max_samples=64)
    assert all(quantizer.mode == "nearest" for _, quantizer in activation_quantizers(block))
    out_quantizer = block.act2.output_quantizer
    set_quant_mode(block, activation="float")  # the float block output is what the quantizer saw
    with torch.no_grad():
        expected_max = max(block(x).max().item() for x in inputs)
    assert out_quantizer.qmin == 0
    assert out_quantizer.scale.item() == pytest.approx(expected_max / out_quantizer.qmax, rel=1e-5)


def _calibrated_w4a4(folded: nn.Module) -> nn.Module:
    quantized = quantize_model(folded, QuantConfig(w_bits=4, a_bits=4))
    calibrate_activations(quantized, _batches())
    layer = quantized.layer2[0].conv1  # one AdaRound-hardened layer exercises the adaround export path
    layer.weight_quantizer.init_adaround(layer.weight)
    with torch.no_grad():
        layer.weight_quantizer.alpha.normal_()
    layer.weight_quantizer.harden(layer.weight)
    layer.weight_quantizer.set_mode("adaround")
    return quantized.eval()


def test_export_save_load_reproduces_outputs_exactly(tmp_path: Path) -> None:
    folded = _resnet()
    quantized = _calibrated_w4a4(folded)
    state = export_integer_state(quantized)
    for name, layer in quant_layers(quantized):
        codes = state[f"{name}.weight_int"]
        qmin, qmax = int(state[f"{name}.weight_qmin"]), int(state[f"{name}.weight_qmax"])
        assert codes.dtype == (torch.int16 if qmax > 127 else torch.int8)
        assert codes.min() >= qmin and codes.max() <= qmax
        assert state[f"{name}.weight_scale"].dim() == layer.weight.dim()
    assert state["layer1.0.act1.output_quantizer.scale"].dtype == torch.float32
    assert state["layer1.0.act1.output_quantizer.qmax"].dtype == torch.int32

    path = tmp_path / "int" / "model.safetensors"
    save_integer_state(state, path, metadata={"bits": "w4a4"})
    loaded_state, metadata = load_integer_file(path)
    assert metadata == {"bits": "w4a4"} and loaded_state.keys() == state.keys()

    restored = load_integer_state(
        quantize_model(folded, QuantConfig(w_bits=4, a_bits=4)), loaded_state
    ).eval()
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(restored(x), quantized(x))
    conv = restored.layer2[0].conv1
    dequantized = (
        state["layer2.0.conv1.weight_int"].float() - state["layer2.0.conv1.weight_zero_point"]
    ) * state["layer2.0.conv1.weight_scale"]
    assert torch.equal(conv.weight.detach(), dequantized)


def test_load_integer_state_is_strict() -> None:
    folded = _resnet()
    quantized = _calibrated_w4a4(folded)
    state = export_integer_state(quantized)
    fresh = quantize_model(folded, QuantConfig(w_bits=4, a_bits=4))
    missing = {key: value for key, value in state.items() if key != "layer3.0.conv2.weight_scale"}
    with pytest.raises(ArtifactError, match="layer3.0.conv2.weight_scale"):
        load_integer_state(fresh, missing)
    with pytest.raises(ArtifactError, match="surplus"):
        load_integer_state(fresh, {**state, "surplus": torch.zeros(1)})
    wrong_shape = {**state, "fc.bias": torch.zeros(7)}
    with pytest.raises(ArtifactError, match="fc.bias"):
        load_integer_state(fresh, wrong_shape)
    with pytest.raises(ArtifactError):
        load_integer_state(quantize_model(folded, QuantConfig(w_bits=3, a_bits=4)), state)


def test_registry_accepts_new_module_types() -> None:
    @register_quant_module(nn.Hardtanh)
    class QuantHardtanh(nn.Module):
        @classmethod
        def from_float(
            cls, module: nn.Module, config: QuantConfig, weight_bits: int, output_bits: int | None
        ) -> "QuantHardtanh":
            return cls()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clamp(-1, 1)

    try:
        quantized = quantize_model(
            nn.Sequential(nn.Linear(3, 3), nn.Hardtanh(), nn.Linear(3, 2)), QuantConfig()
        )
        assert type(quantized[1]) is QuantHardtanh
    finally:
        del QUANT_MODULE_REGISTRY[nn.Hardtanh]


def test_numerics_overrides_apply_in_order_after_the_model_facts():
    """Per-module overrides (wildcards, later entries win field by field) set bits, granularity, symmetry,
    output placement and float modules; unknown patterns and fields are refused."""
    from hdrq_lightning.errors import ConfigError
    from hdrq_lightning.models.shot import build_shot_net
    from hdrq_lightning.quant.fold import fold_batch_norm

    torch.manual_seed(0)
    fp = fold_batch_norm(build_shot_net("resnet_tiny", 5, bottleneck_dim=8).eval())
    config = QuantConfig(w_bits=4, a_bits=4, overrides=[
        {"modules": "backbone.layer4.*", "w_bits": 6, "w_per_channel": False},
        {"modules": ["backbone.layer4.0.conv2"], "w_bits": 3},              # later wins for this one
        {"modules": "backbone.layer1.0.act1", "quantize_output": False},  # this ReLU stays float
        {"modules": "backbone.layer2.0.conv1", "quantize_output": True, "a_bits": 8, "a_symmetric": True},
        {"modules": "classifier", "skip": True},
    ])
    quant = quantize_model(fp, config, init_ranges=False)
    layers = dict(quant_layers(quant))
    assert layers["backbone.layer4.0.conv1"].weight_quantizer.bits == 6
    assert not layers["backbone.layer4.0.conv1"].weight_quantizer.per_channel
    assert layers["backbone.layer4.0.conv2"].weight_quantizer.bits == 3
    assert not layers["backbone.layer4.0.conv2"].weight_quantizer.per_channel  # from the first entry
    assert layers["backbone.layer3.0.conv1"].weight_quantizer.bits == 4
    assert "classifier" not in layers and isinstance(quant.classifier, type(fp.classifier))
    assert layers["backbone.conv1"].weight_quantizer.bits == 8  # the model's declared fact stays
    acts = dict(activation_quantizers(quant))
    assert "backbone.layer1.0.act1.output_quantizer" not in acts
    q = acts["backbone.layer2.0.conv1.output_quantizer"]
    assert q.bits == 8 and q.symmetric
    for bad, message in (([{"modules": "nothing.*", "w_bits": 8}], "does not have"),
                         ([{"modules": "classifier", "wbits": 8}], "unknown fields"),
                         ([{"modules": "classifier", "w_bits": 9}], "w_bits"),
                         ([{"w_bits": 8}], "modules")):
        with pytest.raises(ConfigError, match=message):
            quantize_model(fp, QuantConfig(overrides=bad), init_ranges=False)
