"""The unit walker: each reconstruction unit's calibration inputs, from the float model and from the quantized prefix.

Layer-wise and block-wise post-training methods (BRECQ / QDrop / HDRQ reconstruction, sequential GPTQ) quantize a
network one unit at a time; unit ``k`` needs, over the calibration set, its input as the float model computes it,
its input as the already-quantized units ``0..k-1`` compute it, and the float unit's output (the target).

- ``UnitWalker`` serves a **chain** (the composition of the units in order is the model's forward, as for a
  ResNet's stem, blocks and head): a unit's inputs are the previous unit's outputs, carried forward from one unit to
  the next instead of re-running the prefix, in chunks, on the device within a memory budget and in pinned host
  memory beyond it.
- ``capture_unit_inputs`` serves any network, chain or not (a decoder reading several encoder stages): it runs the
  whole model and records each unit's call arguments ``(args, kwargs)`` with forward pre-hooks.

The reconstruction engine uses the walker for its unit caches (quant/reconstruction.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from hdrq_lightning.quant.cache import CacheBudget, UnitCache, allocate


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
            if previous is not None and previous.pass_name == pass_name and previous.block == index - 1:
                fp_input, fp_on_device = previous.fp_target, previous.on_device("fp_target")  # carried forward
                if fp_on_device and budget.fixed:
                    # a fixed budget counts it; an automatic one measured free memory with it already allocated
                    budget.left -= fp_input.numel() * fp_input.element_size()
                quant_input, quant_on_device = self.run(self.quant_units[index - 1], previous.quant_input, budget,
                                                        True, device)
            else:
                fp_input = quant_input = calibration  # the first unit reads the calibration images in place
                fp_on_device = quant_on_device = True
                for block in range(index):
                    last = block == index - 1
                    fp_input, fp_on_device = self.run(self.fp_units[block], fp_input, budget, last, device)
                    quant_input, quant_on_device = self.run(self.quant_units[block], quant_input, budget, last, device)
            del previous
            fp_target, target_on_device = self.run(self.fp_units[index], fp_input, budget, True, device)
        finally:
            self.quant_model.train(was_training)
        placed = {"fp_input": fp_on_device, "quant_input": quant_on_device, "fp_target": target_on_device}
        self.last = UnitCache(pass_name, index, fp_input, quant_input, fp_target, device,
                              host=frozenset(name for name, on_device in placed.items() if not on_device))
        return self.last


@torch.no_grad()
def capture_unit_inputs(model: nn.Module, units: Sequence[tuple[str, nn.Module]], batches: Iterable[Any]
                        ) -> dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Each unit's call arguments ``(args, kwargs)`` per batch, recorded with forward pre-hooks while ``model``
    runs on ``batches`` (in eval mode): for networks whose units do not chain, e.g. a unit that reads several
    earlier outputs. Tensors are detached; a unit called twice in one forward is recorded twice."""
    recorded: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {name: [] for name, _ in units}

    def detach(value: Any) -> Any:
        return value.detach() if isinstance(value, torch.Tensor) else value

    def hook(name: str):
        def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            recorded[name].append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))
        return record

    handles = [unit.register_forward_pre_hook(hook(name), with_kwargs=True) for name, unit in units]
    training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return recorded
