"""The integer checkpoint: what a quantized model deploys and what quantized merging reads.

A flat ``dict[str, Tensor]`` saved with safetensors. For every quantized layer ``m``: ``m.weight_int``
(int8, or int16 when the grid does not fit), ``m.weight_scale`` and ``m.weight_zero_point`` (float32,
broadcastable to the weight: [C,1,1,1] per channel, [1,1,1,1] per tensor), ``m.weight_qmin`` and
``m.weight_qmax`` (int32 scalars) and ``m.bias`` (float32) if present; dequantized weight =
(weight_int - weight_zero_point) * weight_scale. For every activation quantizer ``a``: ``a.scale``,
``a.zero_point`` (float32 scalars), ``a.qmin``, ``a.qmax`` (int32 scalars). Every other parameter or
buffer keeps its state_dict key (floats as float32). Quantizer internals (AdaRound alpha, mode buffers)
and latent float weights are not part of the format.
"""

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from hdrq_lightning.artifacts import save_weights, unreadable_weights
from hdrq_lightning.errors import ArtifactError
from hdrq_lightning.quant.modules import activation_quantizers, quant_layers, weight_quantizers
from hdrq_lightning.quant.quantizers import WeightQuantizer, integer_range

_LAYER_KEYS = ("weight_int", "weight_scale", "weight_zero_point", "weight_qmin", "weight_qmax")
_ACTIVATION_KEYS = ("scale", "zero_point", "qmin", "qmax")


def _key(module_name: str, leaf: str) -> str:
    return f"{module_name}.{leaf}" if module_name else leaf


def _scale_shape(quantizer: WeightQuantizer, weight: Tensor) -> torch.Size:
    """The quantizer's scale shape for ``weight`` (also before it has a range), a per-tensor scalar written as
    [1, 1, ...] to broadcast."""
    shape = quantizer.range_shape(weight)
    return torch.Size(shape) if shape else torch.Size([1] * weight.dim())


def _other_state(model: nn.Module) -> dict[str, Tensor]:
    """state_dict entries that are neither quantized-layer weights/biases nor quantizer internals."""
    owned = {_key(name, leaf) for name, _ in quant_layers(model) for leaf in ("weight", "bias")}
    prefixes = tuple(_key(name, "") for name, _ in [*weight_quantizers(model), *activation_quantizers(model)])
    return {
        key: value
        for key, value in model.state_dict().items()
        if key not in owned and not (prefixes and key.startswith(prefixes))
    }


def _expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Every key of the integer state of ``model`` with its shape."""
    shapes: dict[str, torch.Size] = {}
    scalar = torch.Size([])
    for name, layer in quant_layers(model):
        scale_shape = _scale_shape(layer.weight_quantizer, layer.weight)
        for leaf, shape in zip(_LAYER_KEYS, (layer.weight.shape, scale_shape, scale_shape, scalar, scalar)):
            shapes[_key(name, leaf)] = shape
        if layer.bias is not None:
            shapes[_key(name, "bias")] = layer.bias.shape
    for name, _ in activation_quantizers(model):
        shapes.update({_key(name, leaf): scalar for leaf in _ACTIVATION_KEYS})
    shapes.update({key: value.shape for key, value in _other_state(model).items()})
    return shapes


def _int32(value: int) -> Tensor:
    return torch.tensor(value, dtype=torch.int32)


@torch.no_grad()
def export_integer_state(model: nn.Module) -> dict[str, Tensor]:
    """The integer state of a quantized model (codes from ``WeightQuantizer.integer``), on the CPU."""
    state: dict[str, Tensor] = {}
    for name, layer in quant_layers(model):
        quantizer = layer.weight_quantizer
        code_dtype = torch.int8 if quantizer.qmin >= -128 and quantizer.qmax <= 127 else torch.int16
        shape = _scale_shape(quantizer, layer.weight)
        state[_key(name, "weight_int")] = quantizer.integer(layer.weight).to(code_dtype)
        state[_key(name, "weight_scale")] = quantizer.effective_scale().float().reshape(shape)
        state[_key(name, "weight_zero_point")] = quantizer.zero_point.float().reshape(shape)
        state[_key(name, "weight_qmin")] = _int32(quantizer.qmin)
        state[_key(name, "weight_qmax")] = _int32(quantizer.qmax)
        if layer.bias is not None:
            state[_key(name, "bias")] = layer.bias.float()
    for name, quantizer in activation_quantizers(model):
        if not bool(quantizer.initialized):
            raise ArtifactError(
                f"Activation quantizer {name!r} was never calibrated; run calibrate_activations before exporting."
            )
        state[_key(name, "scale")] = quantizer.effective_scale().float()
        state[_key(name, "zero_point")] = quantizer.zero_point.float()
        state[_key(name, "qmin")] = _int32(quantizer.qmin)
        state[_key(name, "qmax")] = _int32(quantizer.qmax)
    for key, value in _other_state(model).items():
        state[key] = value.float() if value.is_floating_point() else value
    return {key: value.detach().cpu() for key, value in state.items()}


def _check_layout(model: nn.Module, state: dict[str, Tensor]) -> None:
    expected = _expected_shapes(model)
    hint = "rebuild the model with the architecture and QuantConfig used at export"
    missing = [key for key in expected if key not in state]
    if missing:
        raise ArtifactError(f"The integer state lacks {missing[:5]} ({len(missing)} missing keys); {hint}.")
    extra = [key for key in state if key not in expected]
    if extra:
        raise ArtifactError(
            f"The integer state has unexpected keys {extra[:5]} ({len(extra)} in all); {hint}."
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ArtifactError(
                f"{key!r} has shape {tuple(state[key].shape)} but the model expects {tuple(shape)}; {hint}."
            )


def _checked_range(
    state: dict[str, Tensor], qmin_key: str, qmax_key: str, allowed: list[tuple[int, int]]
) -> tuple[int, int]:
    qmin, qmax = int(state[qmin_key]), int(state[qmax_key])
    if (qmin, qmax) not in allowed:
        raise ArtifactError(
            f"{qmin_key!r}/{qmax_key!r} give the grid [{qmin}, {qmax}] but the model's quantizer allows {allowed}; "
            "rebuild the model with the bit widths used at export."
        )
    return qmin, qmax


@torch.no_grad()
def load_integer_state(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Load an integer state into a ``quantize_model``-made model of the same architecture.

    Latent weights become the dequantized values and every quantizer is set to "nearest", so the forward
    reproduces the integer model exactly. Raises ArtifactError on a missing/extra key or a wrong shape.
    """
    _check_layout(model, state)
    for name, layer in quant_layers(model):
        quantizer = layer.weight_quantizer
        qmin, qmax = _checked_range(
            state, _key(name, "weight_qmin"), _key(name, "weight_qmax"), [(quantizer.qmin, quantizer.qmax)]
        )
        codes = state[_key(name, "weight_int")]
        if codes.is_floating_point() or int(codes.min()) < qmin or int(codes.max()) > qmax:
            raise ArtifactError(
                f"{_key(name, 'weight_int')!r} holds non-integer codes or codes outside [{qmin}, {qmax}]; "
                "re-export the model."
            )
        device = layer.weight.device
        scale = state[_key(name, "weight_scale")].to(device, torch.float32)
        zero_point = state[_key(name, "weight_zero_point")].to(device, torch.float32)
        shape = quantizer.range_shape(layer.weight)  # the quantizer may have no range yet (a swap-only rebuild)
        quantizer.set_range(scale.reshape(shape), zero_point.reshape(shape))
        layer.weight.copy_((codes.to(device, torch.float32) - zero_point) * scale)
        if layer.bias is not None:
            layer.bias.copy_(state[_key(name, "bias")])
        quantizer.set_mode("nearest")
    for name, quantizer in activation_quantizers(model):
        allowed = [integer_range(quantizer.bits, signed=False), integer_range(quantizer.bits, signed=True)]
        qmin, _ = _checked_range(state, _key(name, "qmin"), _key(name, "qmax"), allowed)
        quantizer.set_range(state[_key(name, "scale")], state[_key(name, "zero_point")], signed=qmin < 0)
        quantizer.set_mode("nearest")
    for key, target in _other_state(model).items():
        target.copy_(state[key])
    return model


def save_integer_state(
    state: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state`` as safetensors atomically (temporary file, then ``os.replace``)."""
    save_weights(state, path, metadata)


def load_integer_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read an integer checkpoint and its metadata (empty dict when none was saved)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f"Integer checkpoint {path} does not exist; run the quantization stage or fix the path."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise unreadable_weights(path, error) from None
    return state, metadata
