"""What a network declares about itself for quantization: its reconstruction units and its numerics exceptions.

A model plug-in (an ``nn.Module`` built from ``conf/model/*.yaml``) provides

- ``reconstruction_units() -> [(name, module), ...]``: the units that block reconstruction trains one at a time
  (they share their modules with the model; for a chain, their composition in order is the model's forward);
- ``quant_facts() -> QuantFacts``: the layers that deviate from the uniform bit widths.

``quant/`` reads both from the model and never from a constant of its own. Names are module paths as in
``model.named_modules()`` of the float model; ``fnmatch`` wildcards (``"decoder.*.proj"``) are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from hdrq_lightning.errors import ConfigError


@dataclass(frozen=True)
class QuantFacts:
    """Per-layer numerics exceptions of a network.

    ``eight_bit_weights``: layers whose weights stay at 8 bits (the first and last layers of the papers' setups);
    ``eight_bit_outputs``: layers whose output quantizer is 8-bit (the input of an 8-bit last layer);
    ``output_quantized``: Conv/Linear layers whose output is quantized because no ReLU follows them;
    ``skip``: modules (and everything inside them) left in float.
    """

    eight_bit_weights: tuple[str, ...] = ()
    eight_bit_outputs: tuple[str, ...] = ()
    output_quantized: tuple[str, ...] = ()
    skip: tuple[str, ...] = field(default_factory=tuple)

    @property
    def declares_eight_bit(self) -> bool:
        return bool(self.eight_bit_weights or self.eight_bit_outputs)


def quant_facts(model: nn.Module) -> QuantFacts | None:
    """The model's declared facts, or None for a model that declares none (a plain ``nn.Sequential``)."""
    declare = getattr(model, "quant_facts", None)
    return declare() if callable(declare) else None


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's reconstruction units (``model.reconstruction_units()``), checked to be non-empty."""
    declare = getattr(model, "reconstruction_units", None)
    if not callable(declare):
        raise ConfigError(
            f"{type(model).__name__} does not declare its reconstruction units: give the model plug-in a "
            "reconstruction_units() method returning [(name, module), ...] (see hdrq_lightning/quant/facts.py).")
    units = list(declare())
    if not units:
        raise ConfigError(f"{type(model).__name__}.reconstruction_units() returned no unit; it needs at least one.")
    return units
