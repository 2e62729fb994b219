"""Registry of merge methods and the checks every method shares.

A merge method is a small plug-in (in the spirit of mergekit): a class with a ``name``, a ``Params``
dataclass of its parameters with defaults, and a ``merge`` that maps flat state dicts to one state
dict. ``@merge_method("name")`` registers it; ``get_merge_method("name", **params)`` builds it.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from hdrq_lightning.errors import ArtifactError, ConfigError
from hdrq_lightning.registry import Registry, checked_params

MERGE_METHODS: Registry = Registry("merge method")  # name -> MergeMethod subclass

StateDict = Mapping[str, Tensor]


class MergeMethod(abc.ABC):
    """Merges flat state dicts of experts (optionally relative to a base) into one state dict."""

    name: ClassVar[str]
    Params: ClassVar[type]
    # What the plug-in merges: "float" experts (BN-folded FP state dicts) or "integer" experts (the integer format
    # of quant/export.py); the merge stage refuses a plug-in given the other kind.
    takes: ClassVar[str] = "float"
    needs_base: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = checked_params(self.Params, params, MERGE_METHODS.kind, self.name)

    @abc.abstractmethod
    def merge(
        self,
        experts: Sequence[StateDict],
        base: StateDict | None = None,
        weights: Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        """Return the merged state dict; ``weights`` are per-expert interpolation weights."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


def merge_method(name: str):
    """Class decorator that registers a :class:`MergeMethod` under ``name``."""
    return MERGE_METHODS.register(name)


def get_merge_method(name: str, **params: Any) -> MergeMethod:
    """Instantiate the registered merge method ``name`` with ``params``."""
    return MERGE_METHODS.build(name, **params)


def check_choice(parameter: str, value: object, choices: Collection[object]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices`` (used by ``Params.__post_init__``)."""
    if value not in choices:
        raise ConfigError(f"Merge parameter {parameter}={value!r} is invalid; use one of {sorted(choices)}.")


def check_matching_states(states: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Raise ArtifactError unless all state dicts have the same keys with the same shapes."""
    if not states:
        raise ConfigError("No experts to merge; pass at least one expert state dict.")
    names = list(names) if names is not None else [f"expert {index}" for index in range(len(states))]
    reference = states[0]
    for name, state in zip(names[1:], states[1:]):
        for key in reference.keys() - state.keys():
            raise ArtifactError(
                f"Key '{key}' is in {names[0]} but missing from {name}; "
                "merge only checkpoints of the same architecture and quantization layout."
            )
        for key in state.keys() - reference.keys():
            raise ArtifactError(
                f"Key '{key}' is in {name} but missing from {names[0]}; "
                "merge only checkpoints of the same architecture and quantization layout."
            )
        for key, tensor in reference.items():
            if tensor.shape != state[key].shape:
                raise ArtifactError(
                    f"Key '{key}' has shape {tuple(tensor.shape)} in {names[0]} but "
                    f"{tuple(state[key].shape)} in {name}; merge only checkpoints of the same architecture."
                )


def resolve_weights(
    weights: Sequence[float] | None, num_experts: int, normalise: bool, default: float
) -> list[float]:
    """Per-expert weights: ``default`` each when None, optionally scaled to sum to one."""
    resolved = [default] * num_experts if weights is None else [float(weight) for weight in weights]
    if len(resolved) != num_experts:
        raise ConfigError(
            f"Got {len(resolved)} merge weights for {num_experts} experts; pass one weight per expert."
        )
    if normalise:
        total = sum(resolved)
        if total <= 0 or any(weight < 0 for weight in resolved):
            raise ConfigError(f"Interpolation weights {resolved} must be non-negative with a positive sum.")
        resolved = [weight / total for weight in resolved]
    return resolved


def merge_integer_tensor(key: str, tensors: Sequence[Tensor]) -> Tensor:
    """Integer buffers are not interpolated: batch counters add up, anything else keeps expert 0's value."""
    if key.endswith("num_batches_tracked"):
        return torch.stack(list(tensors)).sum(0).to(tensors[0].dtype)
    return tensors[0].clone()


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_k weights[k] * tensors[k]`` accumulated in float64 and returned in the tensors' dtype."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for tensor, weight in zip(tensors, weights):
        total += weight * tensor.double()
    return total.to(tensors[0].dtype)
