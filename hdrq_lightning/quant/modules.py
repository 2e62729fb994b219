"""Quantized layers, the float-to-quantized module registry and model-level helpers.

``quantize_model`` swaps modules through ``QUANT_MODULE_REGISTRY`` (torchao / Model-Optimizer style).
Activation quantizers sit on module outputs: after every ReLU (including the block output after
add + ReLU) and after the Conv/Linear layers named in ``QuantConfig.output_quant_layers`` or declared by the model
(``quant_facts()``, quant/facts.py), which also names its 8-bit layers. Swapping and range initialisation are two
steps (``quantize_model(..., init_ranges=False)`` then ``initialize_weight_ranges``, or a loaded integer file).
"""

import copy
import dataclasses
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.quant.facts import QuantFacts, quant_facts
from hdrq_lightning.quant.fold import symbolic_graph
from hdrq_lightning.quant.quantizers import RANGE_SEARCHES, ActivationQuantizer, WeightQuantizer, check_bits

CALIBRATION_SAMPLES = 1 << 16


@dataclass
class QuantConfig:
    """Numerics of a quantized model (BRECQ / QDrop / HDRQ defaults: W4A4, per-channel asymmetric weights).

    ``a_bits=None``: weight-only (no activation quantizer anywhere: GPTQ-style post-merge quantization).

    ``overrides``: an ordered list of per-module exceptions applied after the model's declared facts, each
    ``{"modules": pattern or [patterns], <field>: value, ...}`` with fields among ``OVERRIDE_FIELDS`` (module
    paths of the float model, ``fnmatch`` wildcards); where several match a module, the later one wins, field by
    field (as torchao's ``FqnToConfig`` / Model-Optimizer's ``quant_cfg``). E.g.
    ``[{"modules": "backbone.layer4.*", "w_bits": 8}, {"modules": "head.embed.*", "a_symmetric": true}]``.
    """

    w_bits: int = 4
    a_bits: int | None = 4
    w_per_channel: bool = True
    w_symmetric: bool = False
    w_learn_scale: bool = False
    a_symmetric: bool = False
    first_last_8bit: bool = True
    output_quant_layers: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    init_search: str = "mse"
    overrides: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        if self.init_search not in RANGE_SEARCHES:
            raise ConfigError(f"init_search={self.init_search!r} is unknown; use one of {RANGE_SEARCHES}.")
        self.output_quant_layers = tuple(self.output_quant_layers)  # Hydra passes lists
        self.skip = tuple(self.skip)
        self.overrides = tuple(_checked_override(entry, i) for i, entry in enumerate(self.overrides))


# Fields an override may set for the modules it names: weight and output bit widths, grid granularity and
# symmetry, whether the module's output is quantized (placement), and whether it stays in float.
OVERRIDE_FIELDS = {"w_bits": int, "a_bits": int, "w_per_channel": bool, "w_symmetric": bool, "a_symmetric": bool,
                   "quantize_output": bool, "skip": bool}


def _checked_override(entry: Any, index: int) -> dict:
    """One override as a plain dict ``{"modules": (patterns...), field: value}``, or a one-paragraph error."""
    where = f"overrides[{index}]"
    if not isinstance(entry, Mapping) or "modules" not in entry:
        raise ConfigError(f"{where}={entry!r} must be a mapping with 'modules' (a module path or wildcard, or a "
                          f"list of them) and fields among {sorted(OVERRIDE_FIELDS)}, e.g. "
                          "{modules: 'backbone.layer4.*', w_bits: 8}.")
    unknown = sorted(set(entry) - {"modules", *OVERRIDE_FIELDS})
    if unknown:
        raise ConfigError(f"{where} has unknown fields {unknown}; use 'modules' and {sorted(OVERRIDE_FIELDS)}.")
    modules = entry["modules"]
    patterns = (modules,) if isinstance(modules, str) else tuple(modules)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"{where}.modules={modules!r} must be a module path (wildcards allowed) or a list of them.")
    out: dict[str, Any] = {"modules": patterns}
    for key, kind in OVERRIDE_FIELDS.items():
        if key not in entry:
            continue
        value = entry[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}.{key}={value!r} is not an integer bit width.")
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key}={value!r} is not true or false.")
        if kind is int:
            check_bits(value, f"{where}.{key}")
        out[key] = value
    return out


def _resolved_overrides(config: QuantConfig, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per module name, the fields the overrides set for it (later overrides win); every pattern must match."""
    resolved: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(config.overrides):
        _check_patterns(names, entry["modules"], f"overrides[{index}].modules")
        fields = {k: v for k, v in entry.items() if k != "modules"}
        for name in names:
            if _matches(name, entry["modules"]):
                resolved.setdefault(name, {}).update(fields)
    return resolved


class QuantConv2d(nn.Module):
    """Conv2d whose weight passes through ``weight_quantizer`` (and output through ``output_quantizer``)."""

    def __init__(
        self,
        conv: nn.Conv2d,
        weight_quantizer: WeightQuantizer,
        output_quantizer: ActivationQuantizer | None = None,
    ) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ConfigError(f"QuantConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}.")
        self.in_channels, self.out_channels, self.kernel_size = (
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
        )
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.weight_quantizer, self.output_quantizer = weight_quantizer, output_quantizer

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, config: QuantConfig, weight_bits: int, output_bits: int | None = None
    ) -> "QuantConv2d":
        """Quantized copy of ``conv`` with its weight range initialised; output quantized iff output_bits."""
        return cls(
            conv, _weight_quantizer(conv.weight, config, weight_bits), _output_quantizer(config, output_bits)
        )

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_quantizer(self.weight)
        out = F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return out if self.output_quantizer is None else self.output_quantizer(out)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}"
        )


class QuantLinear(nn.Module):
    """Linear whose weight passes through ``weight_quantizer`` (and output through ``output_quantizer``)."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: WeightQuantizer,
        output_quantizer: ActivationQuantizer | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.weight_quantizer, self.output_quantizer = weight_quantizer, output_quantizer

    @classmethod
    def from_float(
        cls, linear: nn.Linear, config: QuantConfig, weight_bits: int, output_bits: int | None = None
    ) -> "QuantLinear":
        """Quantized copy of ``linear`` with its weight range initialised; output quantized iff output_bits."""
        weight_quantizer = _weight_quantizer(linear.weight, config, weight_bits)
        return cls(linear, weight_quantizer, _output_quantizer(config, output_bits))

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight_quantizer(self.weight), self.bias)
        return out if self.output_quantizer is None else self.output_quantizer(out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class QuantReLU(nn.Module):
    """ReLU followed by an activation quantizer (never in place: QDrop needs the float input)."""

    def __init__(self, output_quantizer: ActivationQuantizer) -> None:
        super().__init__()
        self.output_quantizer = output_quantizer

    @classmethod
    def from_float(
        cls,
        relu: nn.ReLU,
        config: QuantConfig,
        weight_bits: int,
        output_bits: int | None = None,
    ) -> "QuantReLU":
        """Quantized ReLU; ``output_bits`` defaults to ``config.a_bits`` (a ReLU has no weight)."""
        return cls(ActivationQuantizer(output_bits or config.a_bits, config.a_symmetric))

    def forward(self, x: Tensor) -> Tensor:
        return self.output_quantizer(F.relu(x))


def _weight_quantizer(weight: Tensor, config: QuantConfig, bits: int) -> WeightQuantizer:
    """A weight quantizer without a range yet (``initialize_weight_ranges`` or a loaded file sets it)."""
    return WeightQuantizer(bits, config.w_per_channel, config.w_symmetric, 0, config.w_learn_scale).to(weight.device)


def _output_quantizer(config: QuantConfig, bits: int | None) -> ActivationQuantizer | None:
    return None if bits is None else ActivationQuantizer(bits, config.a_symmetric)


QUANT_MODULE_REGISTRY: dict[type[nn.Module], type[nn.Module]] = {}
"""Float module type (matched exactly) -> quantized class with
``from_float(module, config, weight_bits, output_bits) -> nn.Module``."""

_QuantClass = TypeVar("_QuantClass", bound=type)


def register_quant_module(float_cls: type[nn.Module]) -> Callable[[_QuantClass], _QuantClass]:
    """Class decorator registering a quantized class (with ``from_float``) as the swap for ``float_cls``."""

    def register(quant_cls: _QuantClass) -> _QuantClass:
        if not hasattr(quant_cls, "from_float"):
            raise TypeError(
                f"{quant_cls.__name__} needs a from_float(module, config, weight_bits, output_bits)."
            )
        QUANT_MODULE_REGISTRY[float_cls] = quant_cls
        return quant_cls

    return register


register_quant_module(nn.Conv2d)(QuantConv2d)
register_quant_module(nn.Linear)(QuantLinear)
register_quant_module(nn.ReLU)(QuantReLU)


def _execution_order(model: nn.Module) -> list[str]:
    """Module names in call order from torch.fx (first call), else in registration order."""
    graph = symbolic_graph(model)
    if graph is None:
        return [name for name, _ in model.named_modules()]
    return list(dict.fromkeys(node.target for node in graph.nodes if node.op == "call_module"))


def _is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in skip)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _check_patterns(names: Iterable[str], patterns: tuple[str, ...], field: str) -> None:
    names = list(names)
    unknown = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(n, pattern) for n in names)]
    if unknown:
        raise ConfigError(f"{field} names modules {unknown} that the model does not have; use module paths of "
                          "model.named_modules() (wildcards allowed).")


def _eight_bit_layers(model: nn.Module, targets: dict[str, nn.Module], producers: set[str],
                      facts: QuantFacts | None) -> tuple[set[str], set[str]]:
    """(layers with 8-bit weights, layers with an 8-bit output): the model's declared ones; a model that declares
    none (a plain ``nn.Sequential``) gets its first and last weighted layers in call order (torch.fx) and the last
    output quantizer before the last layer."""
    if facts is not None and facts.declares_eight_bit:
        names = [name for name, _ in model.named_modules()]  # a skipped layer may be named (it stays float)
        _check_patterns(names, facts.eight_bit_weights, "quant_facts().eight_bit_weights")
        _check_patterns(names, facts.eight_bit_outputs, "quant_facts().eight_bit_outputs")
        return ({n for n in targets if _matches(n, facts.eight_bit_weights)},
                {n for n in targets if _matches(n, facts.eight_bit_outputs)})
    order = [name for name in _execution_order(model) if name in targets]
    weighted = [name for name in order if isinstance(getattr(targets[name], "weight", None), Tensor)]
    if not weighted:
        return set(), set()
    before_last = order[: order.index(weighted[-1])]
    output = next((name for name in reversed(before_last) if name in producers), None)
    return {weighted[0], weighted[-1]}, {output} if output is not None else set()


def quantize_model(model: nn.Module, config: QuantConfig, init_ranges: bool = True) -> nn.Module:
    """Deep copy of ``model`` with every registered module (outside the skipped ones) swapped for its quantized
    class; activation quantizers wait for ``calibrate_activations``.

    The model's ``quant_facts()`` (quant/facts.py) add its output-quantized and skipped layers to the config's and
    name its 8-bit layers (when ``config.first_last_8bit``). ``init_ranges``: initialise the weight ranges
    (``initialize_weight_ranges``, the config's range search); off when the ranges come from a file next.
    """
    facts = quant_facts(model)
    names = [name for name, _ in model.named_modules()]
    overrides = _resolved_overrides(config, names)
    skip = (*config.skip, *(facts.skip if facts else ()), *(n for n, o in overrides.items() if o.get("skip")))
    output_layers = (*config.output_quant_layers, *(facts.output_quantized if facts else ()),
                     *(n for n, o in overrides.items() if o.get("quantize_output")))
    _check_patterns(names, tuple(config.skip), "skip")
    _check_patterns(names, tuple(config.output_quant_layers), "output_quant_layers")
    fused = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) and not _is_skipped(n, skip)]
    if fused:
        raise ConfigError(f"{type(model).__name__} holds nn.MultiheadAttention ({', '.join(fused)}), whose fused "
                          "projections no quantizer would see (its forward hands the weights to a functional kernel); "
                          "call hdrq_lightning.models.attention.unfuse_multihead_attention(model) first (same outputs; "
                          "networks built from conf/model/ get it already), or skip those modules.")
    quantized = copy.deepcopy(model)
    targets = {
        name: module
        for name, module in quantized.named_modules()
        if type(module) in QUANT_MODULE_REGISTRY and not _is_skipped(name, skip)
    }
    producers = {name for name in targets if not isinstance(getattr(targets[name], "weight", None), Tensor)}
    producers |= {name for name in targets if _matches(name, output_layers)}
    unquantized_outputs = {n for n, o in overrides.items() if o.get("quantize_output") is False}
    producers -= unquantized_outputs
    # a weightless module (ReLU) whose output is not quantized has nothing to swap
    targets = {name: module for name, module in targets.items() if name in producers
               or isinstance(getattr(module, "weight", None), Tensor)}
    if config.a_bits is None:  # weight-only: no activation quantizer, weightless modules (ReLU) stay as they are
        targets = {name: module for name, module in targets.items() if name not in producers
                   or isinstance(getattr(module, "weight", None), Tensor)}
        producers = set()
    eight_bit_weights, eight_bit_outputs = (_eight_bit_layers(quantized, targets, producers, facts)
                                            if config.first_last_8bit else (set(), set()))
    symmetric = facts.symmetric_outputs if facts else ()
    _check_patterns(names, tuple(symmetric), "quant_facts().symmetric_outputs")
    for name, module in targets.items():
        override = overrides.get(name, {})
        weight_bits = override.get("w_bits", 8 if name in eight_bit_weights else config.w_bits)
        output_bits = override.get("a_bits", 8 if name in eight_bit_outputs else config.a_bits) \
            if name in producers else None
        factory = QUANT_MODULE_REGISTRY[type(module)]
        layer_fields = {"a_symmetric": True} if _matches(name, symmetric) else {}
        layer_fields.update({k: override[k] for k in ("w_per_channel", "w_symmetric", "a_symmetric") if k in override})
        layer_config = dataclasses.replace(config, **layer_fields) if layer_fields else config
        quantized.set_submodule(name, factory.from_float(module, layer_config, weight_bits, output_bits))
    norms = [
        name
        for name, module in quantized.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    if norms:
        warnings.warn(
            f"BatchNorm layers {norms} are still in the model; fold_batch_norm it before quantizing.",
            stacklevel=2,
        )
    if init_ranges:
        initialize_weight_ranges(quantized, config.init_search)
    return quantized


def initialize_weight_ranges(model: nn.Module, search: str = "mse") -> None:
    """Set every weight quantizer's range from its layer's weight (``search``: mse (L2.4) or minmax)."""
    for _, layer in quant_layers(model):
        layer.weight_quantizer.init_range(layer.weight, search=search)


def _named_instances(model: nn.Module, cls: type) -> Iterator[tuple[str, nn.Module]]:
    return ((name, module) for name, module in model.named_modules() if isinstance(module, cls))


def weight_quantizers(model: nn.Module) -> Iterator[tuple[str, WeightQuantizer]]:
    """(module path, quantizer) of every weight quantizer, e.g. ``("layer1.0.conv1.weight_quantizer", q)``."""
    return _named_instances(model, WeightQuantizer)


def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, ActivationQuantizer]]:
    """(module path, quantizer) of every activation quantizer, e.g. ``("layer1.0.act1.output_quantizer", q)``."""
    return _named_instances(model, ActivationQuantizer)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
    """(module path, layer) of every quantized Conv2d / Linear."""
    return _named_instances(model, (QuantConv2d, QuantLinear))


def set_quant_mode(model: nn.Module, weight: str | None = None, activation: str | None = None) -> None:
    """Set the mode of all weight and/or activation quantizers (None leaves that kind unchanged)."""
    if weight is not None:
        for _, quantizer in weight_quantizers(model):
            quantizer.set_mode(weight)
    if activation is not None:
        for _, quantizer in activation_quantizers(model):
            quantizer.set_mode(activation)


class _UniformSample:
    """A uniform random subset (bottom-k of random keys) of everything added, plus the exact min and max."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.values: Tensor | None = None
        self.keys: Tensor | None = None
        self.extremes: Tensor | None = None

    def add(self, x: Tensor) -> None:
        values = x.detach().reshape(-1).float()
        extremes = torch.stack([values.min(), values.max()])
        keys = torch.rand(values.numel(), device=values.device)
        if self.values is not None:
            values, keys = torch.cat([self.values, values]), torch.cat([self.keys, keys])
            extremes = torch.stack(
                [extremes[0].minimum(self.extremes[0]), extremes[1].maximum(self.extremes[1])]
            )
        if values.numel() > self.capacity:
            keys, index = torch.topk(keys, self.capacity, largest=False)
            values = values[index]
        self.values, self.keys, self.extremes = values, keys, extremes

    def sample(self) -> Tensor:
        return torch.cat([self.values, self.extremes])


@torch.no_grad()
def calibrate_activations(
    model: nn.Module, batches: Iterable[Any], search: str = "mse", max_samples: int = CALIBRATION_SAMPLES,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> None:
    """Initialise every activation quantizer of ``model`` (a whole network or one block) from its inputs.

    Runs ``model`` in eval mode with the activation quantizers bypassed while sampling up to ``max_samples``
    of each quantizer's inputs, then sets each range and mode "nearest". Batches may be (input, target) pairs;
    ``forward(model, batch)`` runs a batch of another shape (a unit with several inputs).
    """
    quantizers = dict(activation_quantizers(model))
    samples = {name: _UniformSample(max_samples) for name in quantizers}
    training = {module: module.training for module in model.modules()}
    hooks = []
    for name, quantizer in quantizers.items():
        quantizer.set_mode("float")
        hooks.append(
            quantizer.register_forward_pre_hook(lambda _, args, name=name: samples[name].add(args[0]))
        )
    model.eval()
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for hook in hooks:
            hook.remove()
        for module, was_training in training.items():
            module.train(was_training)
    unused = [name for name, sample in samples.items() if sample.values is None]
    if unused:
        warnings.warn(
            f"Activation quantizers {unused} saw no input during calibration and stay in float.", stacklevel=2
        )
    for name, quantizer in quantizers.items():
        if samples[name].values is not None:
            quantizer.init_range(samples[name].sample(), search=search)
            quantizer.set_mode("nearest")
