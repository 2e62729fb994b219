"""Where a unit's calibration cache lives: on the GPU when it fits the budget, else in pinned host memory.

A unit's cache is three tensors over the calibration set: the FP input, the quantized prefix's input and the FP
target. On the GPU (the fast case) a step gathers its batch with one ``index_select`` per tensor, inside the
captured CUDA graph. A tensor that does not fit the budget stays in (pinned) host memory: each step gathers its
rows on the host into a pinned staging buffer and copies them to the GPU (PCIe-bound, so slower, but it runs).

The budget (``quant.runtime.cache_budget_gib``; ``null`` = 60% of the GPU memory free when the unit starts) is
filled greedily: each tensor goes to the GPU, as it is computed, while the running total fits. For scale: a
ResNet-50 or ResNet-101 at 224 px with 1024 calibration images needs at most 9.2 GiB per unit (layer1:
3 x 1024 x 256 x 56 x 56 floats); segmentation inputs (1024 x 512) need 10x as much per image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.quant import kernels

log = logging.getLogger("hdrq")

CACHE_DEVICES = ("auto", "device", "host")
# Share of the GPU memory free at a unit's start that an automatic budget may fill (the rest is left for the
# step's activations, gradients and graph pools).
AUTO_BUDGET_FRACTION = 0.6


def check_cache_device(cache_device: str) -> None:
    if cache_device not in CACHE_DEVICES:
        raise ConfigError(f"quant.runtime.cache_device={cache_device!r} is unknown; use one of {CACHE_DEVICES}.")


def cache_budget_bytes(device: torch.device, cache_device: str, budget_gib: float | None) -> float:
    """Bytes of the unit cache allowed on ``device`` ("host": none; the CPU: no limit unless one is given)."""
    if cache_device == "host":
        return 0.0
    if cache_device == "device":
        return float("inf")
    if budget_gib is not None:
        return budget_gib * 2**30
    if device.type != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info(device)
    reusable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return AUTO_BUDGET_FRACTION * (free + reusable)


@dataclass
class CacheBudget:
    """Device bytes left for a unit's cache; each tensor goes to the device while it fits."""

    left: float
    fixed: bool = False  # a budget given by the user (a carried-forward tensor counts against it)

    def place(self, nbytes: int, keep: bool) -> bool:
        """Whether ``nbytes`` go to the device; ``keep``: they stay for the unit (intermediates do not count)."""
        fits = nbytes <= self.left
        if fits and keep:
            self.left -= nbytes
        return fits


@dataclass
class UnitCache:
    """The cached tensors of one unit in one pass; those named in ``host`` live in host memory.

    A unit called with one tensor (a chain's unit, a layer) has ``fp_input`` and ``quant_input`` tensors; a unit
    called with several (a decoder reading four encoder levels, keyword arguments) has a tuple of input tensors
    (the leaves of its call ``(args, kwargs)``), rebuilt into the call by ``spec``. Each tensor has a name:
    ``quant_input``, ``fp_input`` and ``fp_target``, or ``quant_input.0``, ``quant_input.1``, ... per leaf.
    (On a CPU-only run "host" tensors are ordinary CPU tensors: the same code path, no copies.)
    """

    pass_name: str
    unit: int
    fp_input: torch.Tensor | tuple[torch.Tensor, ...]
    quant_input: torch.Tensor | tuple[torch.Tensor, ...]
    fp_target: torch.Tensor
    device: torch.device
    host: frozenset[str] = frozenset()
    spec: Any = None  # pytree spec of the unit's call (args, kwargs) over the input leaves; None: one tensor
    _staging: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.fp_target)

    def input_names(self, kind: str) -> list[str]:
        """Names of the ``quant_input`` or ``fp_input`` tensors, in leaf order."""
        value = getattr(self, kind)
        return [kind] if isinstance(value, torch.Tensor) else [f"{kind}.{i}" for i in range(len(value))]

    @property
    def names(self) -> list[str]:
        return [*self.input_names("quant_input"), *self.input_names("fp_input"), "fp_target"]

    def tensor(self, name: str) -> torch.Tensor:
        kind, _, index = name.partition(".")
        value = getattr(self, kind)
        return value[int(index)] if index else value

    def call(self, leaves: list[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The unit's call ``(args, kwargs)`` from its input leaves (a batch of rows of each)."""
        if self.spec is None:
            return (leaves[0],), {}
        return pytree.tree_unflatten(leaves, self.spec)

    def run(self, unit: torch.nn.Module, leaves: list[torch.Tensor]) -> Any:
        """``unit`` called on a batch of its input leaves."""
        args, kwargs = self.call(leaves)
        return unit(*args, **kwargs)

    def on_device(self, name: str) -> bool:
        return name not in self.host

    @property
    def host_names(self) -> list[str]:
        return [name for name in self.names if name in self.host]

    def gather_device(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` of a device-resident tensor, in its memory layout (graph-capturable).

        Each sample of a dense tensor is one contiguous block (also channels-last: the batch stride is the
        outermost), so the gather is a row gather of a 2-D view: a plain copy kernel, where ``index_select``
        on a 4-D channels-last tensor runs a generic gather at a fraction of the memory bandwidth.
        """
        tensor = self.tensor(name)
        if not kernels.standard_dense(tensor):
            return tensor.index_select(0, indices)
        row = math.prod(tensor.shape[1:])
        rows = tensor.as_strided((len(tensor), row), (row, 1)).index_select(0, indices)
        return rows.as_strided((len(indices), *tensor.shape[1:]), (row, *tensor.stride()[1:]))

    def gather_host(self, name: str, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` (a CPU index tensor) of a host-resident tensor, delivered on the device.

        The rows are gathered into pinned memory and copied without blocking, into ``out`` when given (a CUDA
        graph's static input). Bringing the indices to the host synchronised with the previous step, whose
        copies are therefore complete: one staging buffer is never overwritten while in flight.
        """
        host = self.tensor(name)
        staging = self._staging.get(name)
        if staging is None or staging.shape[0] != len(rows):
            staging = torch.empty((len(rows), *host.shape[1:]), dtype=host.dtype,
                                  pin_memory=self.device.type == "cuda")
            self._staging[name] = staging
        torch.index_select(host, 0, rows, out=staging)
        if out is None:
            return staging.to(self.device, non_blocking=True)
        out.copy_(staging, non_blocking=True)
        return out


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, on_device: bool,
             memory_format: torch.memory_format) -> torch.Tensor:
    """An empty cache tensor on the compute device or in (pinned, when a GPU is used) host memory."""
    if on_device:
        return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda", memory_format=memory_format)
