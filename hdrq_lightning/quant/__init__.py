"""Quantization primitives: BN folding, quantizers, quantized modules and the integer checkpoint."""

from hdrq_lightning.quant.export import (
    export_integer_state,
    load_integer_file,
    load_integer_state,
    save_integer_state,
)
from hdrq_lightning.quant.fold import fold_batch_norm, remove_weight_norm_
from hdrq_lightning.quant.modules import (
    QUANT_MODULE_REGISTRY,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    QuantReLU,
    activation_quantizers,
    calibrate_activations,
    quant_layers,
    quantize_model,
    register_quant_module,
    set_quant_mode,
    weight_quantizers,
)
from hdrq_lightning.quant.noise import rounding_residual_noise
from hdrq_lightning.quant.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = [
    "QUANT_MODULE_REGISTRY",
    "ActivationQuantizer",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantReLU",
    "WeightQuantizer",
    "activation_quantizers",
    "calibrate_activations",
    "export_integer_state",
    "fold_batch_norm",
    "load_integer_file",
    "load_integer_state",
    "quant_layers",
    "quantize_model",
    "register_quant_module",
    "remove_weight_norm_",
    "rounding_residual_noise",
    "save_integer_state",
    "set_quant_mode",
    "weight_quantizers",
]
