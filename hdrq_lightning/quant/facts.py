"""What a network declares about itself for quantization: its reconstruction units and its numerics exceptions.

A model plug-in (an ``nn.Module`` built from ``conf/model/*.yaml``) provides

- ``reconstruction_units(granularity="layer") -> [(name, module), ...]``: the units that block reconstruction
  trains one at a time, in the order the model first calls them. They share their modules with the model. A unit
  is a module the model calls, or an ``nn.Sequential`` wrapping modules the model calls one after the other (its
  input is the first one's call, its output the last one's). ``granularity`` (``quant.units``) is ``layer`` (the
  official split) or ``block`` (coarser); a model with one split may ignore it;
- ``reconstruction_chain = True`` (class attribute) when the units' composition in order *is* the forward: the
  walker then carries each unit's outputs into the next (quant/walker.py ``UnitWalker``); otherwise each unit's
  inputs are captured by hooks on a forward of the whole model (``CaptureWalker``), for any graph;
- ``calibration_forward(images)`` (optional): the forward that calibration runs, when it is not ``forward``
  (the segmentation network runs both heads);
- ``quant_facts() -> QuantFacts``: the layers that deviate from the uniform bit widths.

``quant/`` reads both from the model and never from a constant of its own. Names are module paths as in
``model.named_modules()`` of the float model; ``fnmatch`` wildcards (``"decoder.*.proj"``) are allowed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from hdrq_lightning.errors import ConfigError


@dataclass(frozen=True)
class QuantFacts:
    """Per-layer numerics exceptions of a network.

    ``eight_bit_weights``: layers whose weights stay at 8 bits (the first and last layers of the papers' setups);
    ``eight_bit_outputs``: layers whose output quantizer is 8-bit (the input of an 8-bit last layer);
    ``output_quantized``: Conv/Linear layers whose output is quantized because no ReLU follows them;
    ``symmetric_outputs``: layers whose output quantizer is symmetric (signed outputs, e.g. a linear embedding);
    ``skip``: modules (and everything inside them) left in float.
    """

    eight_bit_weights: tuple[str, ...] = ()
    eight_bit_outputs: tuple[str, ...] = ()
    output_quantized: tuple[str, ...] = ()
    symmetric_outputs: tuple[str, ...] = ()
    skip: tuple[str, ...] = field(default_factory=tuple)

    @property
    def declares_eight_bit(self) -> bool:
        return bool(self.eight_bit_weights or self.eight_bit_outputs)


def quant_facts(model: nn.Module) -> QuantFacts | None:
    """The model's declared facts, or None for a model that declares none (a plain ``nn.Sequential``)."""
    declare = getattr(model, "quant_facts", None)
    return declare() if callable(declare) else None


GRANULARITIES = ("layer", "block")


def reconstruction_units(model: nn.Module, granularity: str = "layer") -> list[tuple[str, nn.Module]]:
    """The model's reconstruction units (``model.reconstruction_units()``), checked to be non-empty.

    ``granularity`` goes to models whose method takes it (``layer`` or ``block``)."""
    declare = getattr(model, "reconstruction_units", None)
    if not callable(declare):
        raise ConfigError(
            f"{type(model).__name__} does not declare its reconstruction units: give the model plug-in a "
            "reconstruction_units() method returning [(name, module), ...] (see hdrq_lightning/quant/facts.py).")
    if granularity not in GRANULARITIES:
        raise ConfigError(f"quant.units={granularity!r} is unknown; use one of {GRANULARITIES}.")
    takes = "granularity" in inspect.signature(declare).parameters
    units = list(declare(granularity=granularity) if takes else declare())
    if not units:
        raise ConfigError(f"{type(model).__name__}.reconstruction_units() returned no unit; it needs at least one.")
    return units


def walks_as_chain(model: nn.Module) -> bool:
    """Whether the model declares its units a chain (their composition in order is its forward)."""
    return bool(getattr(model, "reconstruction_chain", False))


def calibration_forward(model: nn.Module, images: Tensor) -> Any:
    """The forward calibration runs: ``model.calibration_forward(images)`` where declared, else ``model(images)``."""
    forward = getattr(model, "calibration_forward", None)
    return forward(images) if callable(forward) else model(images)
