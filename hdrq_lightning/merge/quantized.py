"""Merge of quantized experts on the merged integer grid, with noise-sampled rounding (HDRQ Sec. 4.3).

Integer format (flat dict). Each quantized layer ``m`` has ``m.weight_int`` (int8/int16),
``m.weight_scale`` (float32, broadcastable to the weight), ``m.weight_zero_point`` (float32, same
shape as the scale), ``m.weight_qmin`` / ``m.weight_qmax`` (int32 scalars) and optionally
``m.bias``; each activation quantizer ``a`` has ``a.scale``, ``a.zero_point``, ``a.qmin``,
``a.qmax``; every other tensor keeps its ordinary key. Expert k's weight is q_k = (I_k - z_k) D_k.

Eq. 11: D = sum_k w_k D_k, z = round(sum_k w_k z_k), I = clamp(round(v) + z, qmin, qmax) with
v = sum_k w_k q_k / D. As in the official code, an element is ambiguous where the experts' integers
average to a half-integer, sum_k w_k (I_k - z_k) in Z + 1/2 (two experts: an odd integer sum), whatever
their steps: with similar steps Eq. 11 then sits next to a rounding boundary and its direction is
decided by step noise rather than by the weights. Three experts with uniform weights are never
ambiguous (paper, Table 2). Without noise, v is rounded half to even (torch.round).
Eq. 12: at the ambiguous elements only, eps_k ~ U[-D_k/2, D_k/2] is added to each expert's weight
before merging; per layer, the sample whose merged weight m best aligns with the interpolation
(sum_k |cos(m - q_k, mid - q_k)|, mid = sum_k w_k q_k) is kept. Everything else (biases,
activation steps and zero points, BN buffers) is averaged as by the ``mean`` method.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hdrq_lightning.errors import ArtifactError, ConfigError
from hdrq_lightning.merge.average import average_states
from hdrq_lightning.merge.registry import (
    MergeMethod,
    StateDict,
    check_choice,
    check_matching_states,
    merge_method,
    resolve_weights,
    weighted_sum,
)

WEIGHT_FIELDS = ("weight_int", "weight_scale", "weight_zero_point", "weight_qmin", "weight_qmax")
ACTIVATION_FIELDS = ("scale", "zero_point", "qmin", "qmax")


@dataclass(frozen=True)
class QuantizedLayout:
    """Prefixes of the quantized layers and activation quantizers of an integer-format state dict."""

    weight_layers: tuple[str, ...]
    activation_quantizers: tuple[str, ...]

    @property
    def grid_bound_keys(self) -> list[str]:
        """The qmin/qmax keys, which must agree across experts."""
        return [f"{layer}.weight_{bound}" for layer in self.weight_layers for bound in ("qmin", "qmax")] + [
            f"{quantizer}.{bound}" for quantizer in self.activation_quantizers for bound in ("qmin", "qmax")
        ]


def quantized_layout(state: StateDict) -> QuantizedLayout:
    """Find the quantized layers (``m.weight_int``) and activation quantizers (``a.scale`` + siblings)."""
    layers = tuple(key[: -len(".weight_int")] for key in state if key.endswith(".weight_int"))
    for layer in layers:
        for field in WEIGHT_FIELDS:
            if f"{layer}.{field}" not in state:
                raise ArtifactError(
                    f"Quantized layer '{layer}' lacks '{layer}.{field}'; export quantized experts with "
                    f"{list(WEIGHT_FIELDS)} per layer."
                )
    activations = tuple(
        prefix
        for prefix in (key[: -len(".scale")] for key in state if key.endswith(".scale"))
        if all(f"{prefix}.{field}" in state for field in ACTIVATION_FIELDS)
    )
    return QuantizedLayout(layers, activations)


def dequantize_state(state: StateDict, keep_activation_quantizers: bool = False) -> dict[str, Tensor]:
    """Map the integer format to an ordinary float state dict with ``m.weight = (I - z) * D``.

    Activation quantizer entries are dropped unless ``keep_activation_quantizers``.
    """
    layout = quantized_layout(state)
    layers = set(layout.weight_layers)
    dropped = {f"{layer}.{field}" for layer in layers for field in WEIGHT_FIELDS}
    if not keep_activation_quantizers:
        dropped |= {
            f"{prefix}.{field}" for prefix in layout.activation_quantizers for field in ACTIVATION_FIELDS
        }
    result: dict[str, Tensor] = {}
    for key, tensor in state.items():
        layer = key[: -len(".weight_int")]
        if key.endswith(".weight_int") and layer in layers:
            scale = state[f"{layer}.weight_scale"]
            result[f"{layer}.weight"] = (
                (tensor.double() - state[f"{layer}.weight_zero_point"].double()) * scale.double()
            ).to(scale.dtype)
        elif key not in dropped:
            result[key] = tensor
    return result


def _to_grid(value: Tensor, zero_point: Tensor, qmin: int, qmax: int, dtype: torch.dtype) -> Tensor:
    """Integers on the merged grid: clamp(round(value) + z, qmin, qmax), round half to even."""
    return (torch.round(value) + zero_point).clamp(qmin, qmax).to(dtype)


def _dequantized_experts(
    integers: Sequence[Tensor], scales: Sequence[Tensor], zero_points: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """Stacked expert weights q_k = (I_k - z_k) D_k and steps D_k, broadcast to the weight, in float64."""
    shape = integers[0].shape

    def stack(tensors: Sequence[Tensor]) -> Tensor:
        return torch.stack([tensor.double().expand(shape) for tensor in tensors])

    steps = stack(scales)
    return (stack(integers) - stack(zero_points)) * steps, steps


def _per_expert_view(weights: Sequence[float], like: Tensor) -> Tensor:
    """Interpolation weights shaped to broadcast against a (K, ...) stack ``like``."""
    return torch.tensor(weights, dtype=torch.float64, device=like.device).view((-1,) + (1,) * (like.ndim - 1))


@dataclass
class _LayerGrid:
    """One layer's merge: the Eq. 11 integers and, at the ambiguous elements, what sampling needs.

    Tensors named per element hold only the ambiguous elements (n of them); ``fixed_*`` hold the
    unambiguous elements' share of the cosine terms, identical in every sample.
    """

    rounded: Tensor  # merged integers, half-integers rounded to even
    ambiguous: Tensor  # bool mask over the weight
    weights: Tensor  # (K, 1) normalised interpolation weights
    expert_steps: Tensor  # (K, n) D_k
    expert_values: Tensor  # (K, n) q_k
    midpoint: Tensor  # (n,) sum_k w_k q_k
    step: Tensor  # (n,) merged D
    zero_point: Tensor  # (n,) merged z
    to_midpoint_norm: Tensor  # (K,) ||mid - q_k|| over the layer
    fixed_dot: Tensor  # (K,) sum over unambiguous elements of (m - q_k)(mid - q_k)
    fixed_square: Tensor  # (K,) sum over unambiguous elements of (m - q_k)^2
    qmin: int
    qmax: int

    @property
    def has_ambiguity(self) -> bool:
        return self.midpoint.numel() > 0

    def sample(self, generator: torch.Generator) -> Tensor:
        """Merged integers at the ambiguous elements for one noise draw (Eq. 12)."""
        uniform = torch.rand(
            self.expert_steps.shape, generator=generator, dtype=torch.float64, device=self.expert_steps.device
        )
        noise = (uniform - 0.5) * self.expert_steps
        value = (self.midpoint + (self.weights * noise).sum(0)) / self.step
        return _to_grid(value, self.zero_point, self.qmin, self.qmax, self.rounded.dtype)

    def alignment(self, integers: Tensor) -> Tensor:
        """c_k = |cos(m - q_k, mid - q_k)| over the layer for the sample with these ambiguous integers."""
        merged = (integers.double() - self.zero_point) * self.step
        offsets = merged - self.expert_values
        dot = self.fixed_dot + (offsets * (self.midpoint - self.expert_values)).sum(1)
        square = self.fixed_square + offsets.square().sum(1)
        norms = (square.sqrt() * self.to_midpoint_norm).clamp_min(torch.finfo(torch.float64).tiny)
        return (dot / norms).abs()

    def fill(self, integers: Tensor) -> Tensor:
        """The full merged integer tensor with ``integers`` at the ambiguous elements."""
        merged = self.rounded.clone()
        merged[self.ambiguous] = integers
        return merged


def _layer_grid(
    experts: Sequence[StateDict], weights: Sequence[float], layer: str, tolerance: float
) -> tuple[_LayerGrid, Tensor, Tensor]:
    """The layer's merge grid plus its merged scale and zero point (in the experts' dtypes)."""
    integers = [expert[f"{layer}.weight_int"] for expert in experts]
    scales = [expert[f"{layer}.weight_scale"] for expert in experts]
    zero_points = [expert[f"{layer}.weight_zero_point"] for expert in experts]
    qmin, qmax = int(experts[0][f"{layer}.weight_qmin"]), int(experts[0][f"{layer}.weight_qmax"])
    merged_scale = weighted_sum(scales, weights)
    if bool((merged_scale <= 0).any()):
        raise ArtifactError(
            f"Layer '{layer}' has a non-positive weight step; re-export the experts' quantizers."
        )
    merged_zero_point = torch.round(weighted_sum(zero_points, weights).double()).to(zero_points[0].dtype)
    shape = integers[0].shape
    values, steps = _dequantized_experts(integers, scales, zero_points)
    weight = _per_expert_view(weights, values)
    midpoint = (weight * values).sum(0)
    step = merged_scale.double().expand(shape)
    zero_point = merged_zero_point.double().expand(shape)
    value = midpoint / step
    integer_mean = (weight * torch.stack([i.double() - z.double() for i, z in zip(integers, zero_points)])).sum(0)
    ambiguous = ((integer_mean - integer_mean.floor()) - 0.5).abs() <= tolerance
    rounded = _to_grid(value, zero_point, qmin, qmax, integers[0].dtype)
    to_midpoint = midpoint - values
    offsets = (rounded.double() - zero_point) * step - values
    unambiguous = ~ambiguous
    grid = _LayerGrid(
        rounded=rounded,
        ambiguous=ambiguous,
        weights=weight.view(-1, 1),
        expert_steps=steps[:, ambiguous],
        expert_values=values[:, ambiguous],
        midpoint=midpoint[ambiguous],
        step=step[ambiguous],
        zero_point=zero_point[ambiguous],
        to_midpoint_norm=to_midpoint.flatten(1).norm(dim=1),
        fixed_dot=(offsets * to_midpoint * unambiguous).flatten(1).sum(1),
        fixed_square=(offsets.square() * unambiguous).flatten(1).sum(1),
        qmin=qmin,
        qmax=qmax,
    )
    return grid, merged_scale, merged_zero_point


@merge_method("quantized")
class QuantizedMerge(MergeMethod):
    """HDRQ merge of quantized experts (integer format in, integer format out; ``base`` is not used)."""

    takes = "integer"

    @dataclass
    class Params:
        """sampling: "noise" resolves ambiguous roundings by Eq. 12, "none" rounds half to even;
        num_samples: noise draws per layer; selection: "cosine" (best sum of |cos|),
        "cosine_sequential" (official code: replace only if every expert's |cos| improves) or "none"
        (first draw); seed: seeds the draws; ambiguity_tol: distance to a half-integer that counts as tied."""

        sampling: str = "noise"
        num_samples: int = 100
        selection: str = "cosine"
        seed: int = 0
        ambiguity_tol: float = 1e-6

        def __post_init__(self) -> None:
            check_choice("sampling", self.sampling, ("none", "noise"))
            check_choice("selection", self.selection, ("cosine", "cosine_sequential", "none"))
            if self.num_samples < 1:
                raise ConfigError(
                    f"num_samples={self.num_samples} is invalid; draw at least one noise sample."
                )
            if not 0.0 <= self.ambiguity_tol < 0.5:
                raise ConfigError(f"ambiguity_tol={self.ambiguity_tol} is invalid; use a value in [0, 0.5).")

    def merge(
        self,
        experts: Sequence[StateDict],
        base: StateDict | None = None,
        weights: Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        resolved, layout, merged = self._shared_merge(experts, weights)
        generators = self._layer_generators(experts[0], layout)
        for layer, generator in zip(layout.weight_layers, generators):
            grid, scale, zero_point = _layer_grid(experts, resolved, layer, self.params.ambiguity_tol)
            merged[f"{layer}.weight_scale"], merged[f"{layer}.weight_zero_point"] = scale, zero_point
            merged[f"{layer}.weight_int"] = self._select(grid, generator)
        return {key: merged[key] for key in experts[0]}

    def sample_merges(
        self, experts: Sequence[StateDict], weights: Sequence[float] | None = None
    ) -> Iterator[dict[str, Tensor]]:
        """Yield each noise-sampled merged model (one deterministic merge when ``sampling="none"``).

        Sample s uses the same draws as sample s of :meth:`merge`; unquantized tensors are shared
        between the yielded dicts, so treat them as read-only.
        """
        resolved, layout, shared = self._shared_merge(experts, weights)
        generators = self._layer_generators(experts[0], layout)
        grids = []
        for layer in layout.weight_layers:
            grid, scale, zero_point = _layer_grid(experts, resolved, layer, self.params.ambiguity_tol)
            shared[f"{layer}.weight_scale"], shared[f"{layer}.weight_zero_point"] = scale, zero_point
            grids.append(grid)
        order = list(experts[0])
        count = self.params.num_samples if self.params.sampling == "noise" else 1

        def samples() -> Iterator[dict[str, Tensor]]:
            for _ in range(count):
                sample = dict(shared)
                for layer, grid, generator in zip(layout.weight_layers, grids, generators):
                    noisy = self.params.sampling == "noise" and grid.has_ambiguity
                    sample[f"{layer}.weight_int"] = (
                        grid.fill(grid.sample(generator)) if noisy else grid.rounded
                    )
                yield {key: sample[key] for key in order}

        return samples()

    def _shared_merge(
        self, experts: Sequence[StateDict], weights: Sequence[float] | None
    ) -> tuple[list[float], QuantizedLayout, dict[str, Tensor]]:
        """Weights, layout and every merged tensor but the layers' weight integers, steps and zero points."""
        check_matching_states(experts)
        resolved = resolve_weights(weights, len(experts), normalise=True, default=1.0)
        layout = quantized_layout(experts[0])
        bounds = layout.grid_bound_keys
        for key in bounds:
            if any(not torch.equal(expert[key], experts[0][key]) for expert in experts[1:]):
                raise ArtifactError(
                    f"'{key}' differs between experts; merge only experts quantized with the same bit widths."
                )
        excluded = set(bounds) | {
            f"{layer}.{field}" for layer in layout.weight_layers for field in WEIGHT_FIELDS
        }
        merged = average_states(experts, resolved, keys=[key for key in experts[0] if key not in excluded])
        merged.update({key: experts[0][key].clone() for key in bounds})
        return resolved, layout, merged

    def _layer_generators(self, state: StateDict, layout: QuantizedLayout) -> list[torch.Generator]:
        """One generator per quantized layer, seeded from ``seed``: draws do not depend on visiting order."""
        seeds = torch.randint(
            0, 2**62, (len(layout.weight_layers),), generator=torch.Generator().manual_seed(self.params.seed)
        ).tolist()
        generators = []
        for layer, layer_seed in zip(layout.weight_layers, seeds):
            generator = torch.Generator(device=state[f"{layer}.weight_int"].device)
            generators.append(generator.manual_seed(layer_seed))
        return generators

    def _select(self, grid: _LayerGrid, generator: torch.Generator) -> Tensor:
        """The layer's merged integers under the configured sampling and selection rule."""
        if self.params.sampling == "none" or not grid.has_ambiguity:
            return grid.rounded
        best = grid.sample(generator)
        if self.params.selection == "none":
            return grid.fill(best)
        best_alignment = grid.alignment(best)
        for _ in range(self.params.num_samples - 1):
            candidate = grid.sample(generator)
            alignment = grid.alignment(candidate)
            if self.params.selection == "cosine":
                better = alignment.sum() > best_alignment.sum()
            else:
                better = (alignment > best_alignment).all()
            best = torch.where(better, candidate, best)
            best_alignment = torch.where(better, alignment, best_alignment)
        return grid.fill(best)
