"""The unit walker: each reconstruction unit's calibration inputs, from the float model and from the quantized prefix.

Layer-wise and block-wise post-training methods (BRECQ / QDrop / HDRQ reconstruction, sequential GPTQ) quantize a
network one unit at a time; unit ``k`` needs, over the calibration set, its input as the float model computes it,
its input as the already-quantized units ``0..k-1`` compute it, and the float unit's output (the target).

- ``UnitWalker`` serves a **chain** (the composition of the units in order is the model's forward, as for a
  ResNet's stem, blocks and head): a unit's inputs are the previous unit's outputs, carried forward from one unit to
  the next instead of re-running the prefix, in chunks, on the device within a memory budget and in pinned host
  memory beyond it.
- ``CaptureWalker`` serves any network, chain or not (a decoder reading several encoder levels, two heads on one
  encoder): unit ``k``'s call ``(args, kwargs)`` is captured by a forward pre-hook on its first module while the
  whole model runs the calibration rows, and its target by a hook on its last module, which then stops the
  forward (what the official HDRQ code does). Each unit costs a prefix forward per model instead of one unit
  forward; nothing is carried between units, so only the current unit's tensors are held.

The reconstruction engine uses a walker for its unit caches (quant/reconstruction.py): ``UnitWalker`` for models
that declare their units a chain (``reconstruction_chain``), ``CaptureWalker`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.quant.cache import CacheBudget, UnitCache, allocate
from hdrq_lightning.quant.facts import calibration_forward


class UnitWalker:
    """Calibration tensors of the units of a chain, float and quantized side by side.

    ``fp_units`` and ``quant_units`` are the two models' units in order (sharing modules with their models, so a
    unit trained in between is walked as it now is); ``quant_model`` is the quantized model they belong to, put in
    eval mode while walking (no QDrop drop) and back in its mode after; ``chunk`` is the number of calibration rows
    run at once. The walker keeps the last cache it served: asked for the next unit in the same pass, it carries
    that cache forward (and lets it go before computing the new target, so two caches never coexist in full).
    """

    def __init__(self, fp_units: Sequence[nn.Module], quant_units: Sequence[nn.Module], quant_model: nn.Module,
                 chunk: int = 256, channels_last: bool = False) -> None:
        if len(fp_units) != len(quant_units):
            raise ValueError(f"{len(fp_units)} float units but {len(quant_units)} quantized ones")
        self.fp_units, self.quant_units, self.quant_model = list(fp_units), list(quant_units), quant_model
        self.chunk, self.channels_last = chunk, channels_last
        self.last: UnitCache | None = None

    def forget(self) -> None:
        """Drop the last cache: the next one is walked from the calibration images."""
        self.last = None

    @torch.no_grad()
    def run(self, unit: nn.Module, inputs: torch.Tensor, budget: CacheBudget, keep: bool, device: torch.device
            ) -> tuple[torch.Tensor, bool]:
        """``unit`` over ``inputs`` in chunks, into a tensor on ``device`` when it fits ``budget`` (else host).

        Returns (output, whether it is on the device). ``keep``: the output is part of a unit's cache and uses up
        the budget (intermediates of a prefix walk do not).
        """
        output, on_device = None, True
        for start in range(0, len(inputs), self.chunk):
            result = unit(inputs[start : start + self.chunk].to(device, non_blocking=True))
            if output is None:
                shape = (len(inputs), *result.shape[1:])
                on_device = budget.place(math.prod(shape) * result.element_size(), keep)
                layout = torch.channels_last if self.channels_last and result.dim() == 4 else torch.contiguous_format
                output = allocate(shape, result.dtype, device, on_device, layout)
            output[start : start + len(result)].copy_(result)
        return output, on_device

    @torch.no_grad()
    def cache(self, index: int, pass_name: str, calibration: torch.Tensor, budget: CacheBudget,
              device: torch.device) -> UnitCache:
        """Unit ``index``'s FP input, quantized-prefix input and FP target over ``calibration`` (the model's input
        rows), on ``device`` within ``budget`` (beyond it in host memory).

        When the last cache served is unit ``index - 1``'s in the same pass, the FP input is its target and the
        quantized input its quantized input run through the (now trained) previous unit; otherwise both prefixes
        are walked from the calibration images.
        """
        previous, self.last = self.last, None
        was_training = self.quant_model.training
        self.quant_model.eval()
        try:
            if previous is not None and previous.pass_name == pass_name and previous.unit == index - 1:
                fp_input, fp_on_device = previous.fp_target, previous.on_device("fp_target")  # carried forward
                if fp_on_device and budget.fixed:
                    # a fixed budget counts it; an automatic one measured free memory with it already allocated
                    budget.left -= fp_input.numel() * fp_input.element_size()
                quant_input, quant_on_device = self.run(self.quant_units[index - 1], previous.quant_input, budget,
                                                        True, device)
            else:
                fp_input = quant_input = calibration  # the first unit reads the calibration images in place
                fp_on_device = quant_on_device = True
                for unit in range(index):
                    last = unit == index - 1
                    fp_input, fp_on_device = self.run(self.fp_units[unit], fp_input, budget, last, device)
                    quant_input, quant_on_device = self.run(self.quant_units[unit], quant_input, budget, last, device)
            del previous
            fp_target, target_on_device = self.run(self.fp_units[index], fp_input, budget, True, device)
        finally:
            self.quant_model.train(was_training)
        placed = {"fp_input": fp_on_device, "quant_input": quant_on_device, "fp_target": target_on_device}
        self.last = UnitCache(pass_name, index, fp_input, quant_input, fp_target, device,
                              host=frozenset(name for name, on_device in placed.items() if not on_device))
        return self.last


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


def unit_ends(unit: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(module whose call is the unit's input, module whose output is the unit's output): for an
    ``nn.Sequential`` its first and last modules (also when it wraps modules the model calls one by one)."""
    if isinstance(unit, nn.Sequential) and len(unit) > 0:
        return unit[0], unit[-1]
    return unit, unit


class CaptureWalker:
    """Calibration tensors of the units of any network, captured on the units' first calls.

    ``fp_model``/``quant_model`` and their units ``(name, module)`` in the order the model first calls them; the
    quantized model runs in eval mode (no QDrop drop) while capturing. The forward is the model's
    ``calibration_forward`` (quant/facts.py). A unit's call may hold several tensors (positional or keyword,
    nested in lists): they are its input leaves, each cached, placed on the device or the host on its own.
    """

    def __init__(self, fp_model: nn.Module, quant_model: nn.Module, fp_units: Sequence[tuple[str, nn.Module]],
                 quant_units: Sequence[tuple[str, nn.Module]], chunk: int = 256, channels_last: bool = False) -> None:
        if len(fp_units) != len(quant_units):
            raise ValueError(f"{len(fp_units)} float units but {len(quant_units)} quantized ones")
        self.fp_model, self.quant_model = fp_model, quant_model
        self.names = [name for name, _ in fp_units]
        self.fp_units, self.quant_units = [u for _, u in fp_units], [u for _, u in quant_units]
        self.chunk, self.channels_last = chunk, channels_last

    def forget(self) -> None:
        """Nothing is carried between units."""

    def _store(self, value: torch.Tensor, rows: int, budget: CacheBudget, device: torch.device
               ) -> tuple[torch.Tensor, bool]:
        shape = (rows, *value.shape[1:])
        on_device = budget.place(math.prod(shape) * value.element_size(), True)
        layout = torch.channels_last if self.channels_last and value.dim() == 4 else torch.contiguous_format
        return allocate(shape, value.dtype, device, on_device, layout), on_device

    @torch.no_grad()
    def _capture(self, model: nn.Module, index: int, calibration: torch.Tensor, budget: CacheBudget,
                 device: torch.device, with_target: bool) -> tuple[list[torch.Tensor], list[bool], Any,
                                                                   torch.Tensor | None, bool]:
        """(input leaves, whether each is on the device, call spec, target or None, target on the device)."""
        name = self.names[index]
        entry, exit_ = unit_ends((self.fp_units if with_target else self.quant_units)[index])
        rows = len(calibration)
        state: dict[str, Any] = {"leaves": None, "target": None}

        def on_call(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if state["called"]:
                return
            state["called"] = True
            leaves, spec = pytree.tree_flatten((args, kwargs))
            if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and len(leaf) == state["n"]
                                     and leaf.is_floating_point() for leaf in leaves):
                raise ConfigError(
                    f"reconstruction unit {name!r} is called with arguments that are not all float tensors with the "
                    "calibration batch as their first dimension; declare units whose inputs are activations.")
            if state["leaves"] is None:
                stored = [self._store(leaf, rows, budget, device) for leaf in leaves]
                state["leaves"], state["placed"] = [t for t, _ in stored], [p for _, p in stored]
                state["spec"] = spec
            elif spec != state["spec"]:
                raise ConfigError(f"reconstruction unit {name!r} is called with a different structure per batch.")
            for stored, leaf in zip(state["leaves"], leaves):  # copied now: later in-place ops cannot change it
                stored[state["start"] : state["start"] + state["n"]].copy_(leaf)
            if not with_target:
                raise _Stop

        def on_output(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not state["called"]:
                return
            if not isinstance(output, torch.Tensor):
                raise ConfigError(f"reconstruction unit {name!r} returns {type(output).__name__}, not a tensor; "
                                  "a unit's output must be one tensor (its reconstruction target).")
            if state["target"] is None:
                state["target"], state["target_placed"] = self._store(output, rows, budget, device)
            state["target"][state["start"] : state["start"] + state["n"]].copy_(output)
            state["returned"] = True
            raise _Stop

        handles = [entry.register_forward_pre_hook(on_call, with_kwargs=True)]
        if with_target:
            handles.append(exit_.register_forward_hook(on_output))
        training = model.training
        model.eval()
        try:
            for start in range(0, rows, self.chunk):
                images = calibration[start : start + self.chunk].to(device, non_blocking=True)
                state.update(start=start, n=len(images), called=False, returned=False)
                try:
                    calibration_forward(model, images)
                except _Stop:
                    pass
                if not state["called"]:
                    raise ConfigError(f"reconstruction unit {name!r} is never called by the model's calibration "
                                      "forward; reconstruction_units() must name modules the forward runs.")
                if with_target and not state["returned"]:
                    raise ConfigError(f"reconstruction unit {name!r}: its last module does not run after its first "
                                      "one in the model's forward; a unit wraps modules the model calls in order.")
        finally:
            for handle in handles:
                handle.remove()
            model.train(training)
        return (state["leaves"], state["placed"], state["spec"], state["target"],
                state.get("target_placed", True))

    @torch.no_grad()
    def cache(self, index: int, pass_name: str, calibration: torch.Tensor, budget: CacheBudget,
              device: torch.device) -> UnitCache:
        """Unit ``index``'s FP input, quantized-model input and FP target over ``calibration``."""
        fp_leaves, fp_placed, spec, target, target_placed = self._capture(
            self.fp_model, index, calibration, budget, device, with_target=True)
        quant_leaves, quant_placed, quant_spec, _, _ = self._capture(
            self.quant_model, index, calibration, budget, device, with_target=False)
        if quant_spec != spec or any(q.shape != f.shape for q, f in zip(quant_leaves, fp_leaves)):
            raise ConfigError(f"reconstruction unit {self.names[index]!r} is called differently in the float and "
                              "the quantized model.")
        single = spec == pytree.tree_flatten(((fp_leaves[0],), {}))[1]
        if single:
            names = {"fp_input": fp_placed[0], "quant_input": quant_placed[0]}
            fp_input, quant_input, spec = fp_leaves[0], quant_leaves[0], None
        else:
            names = {**{f"fp_input.{i}": p for i, p in enumerate(fp_placed)},
                     **{f"quant_input.{i}": p for i, p in enumerate(quant_placed)}}
            fp_input, quant_input = tuple(fp_leaves), tuple(quant_leaves)
        names["fp_target"] = target_placed
        return UnitCache(pass_name, index, fp_input, quant_input, target, device,
                         host=frozenset(name for name, on_device in names.items() if not on_device), spec=spec)
