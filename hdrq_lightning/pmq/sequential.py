"""The forward-order driver of post-merge quantization (GPTQ's ``opt_sequential``, FeatCal's two streams).

Per task t two streams of unit inputs are carried from unit to unit (quant/walker.py's chunked forward, on the
device within a memory budget and in host memory beyond it): the **deployed** stream through the merged model
whose earlier units are already quantized (what the layer will see at test time; it builds H), and the
**expert** stream through expert t's own units (only in the target, mixed in with the method's input mix). Inside
a unit the layers are solved in call order (true-sequential): a layer's inputs are recaptured after the layers
before it in the unit are on the grid. Each layer: moments per task (pmq/objective.py), the method's target
(pmq/methods.py), the grid fitted on the target (the layer's ``WeightQuantizer``: min-max as the GPTQ reference,
or the project's MSE search), then GPTQ or round-to-nearest; the codes land in the layer so that the integer
export writes exactly them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.pmq.gptq import GptqInfo, Grid, gptq_quantize, round_to_nearest
from hdrq_lightning.pmq.methods import PmqMethod
from hdrq_lightning.pmq.objective import TaskMoments, deployed_input_errors, layer_rows
from hdrq_lightning.quant.cache import CacheBudget, cache_budget_bytes
from hdrq_lightning.quant.facts import reconstruction_units, walks_as_chain
from hdrq_lightning.quant.walker import UnitWalker

WEIGHTED = (nn.Conv2d, nn.Linear)


class _Captured(Exception):
    """Raised by a capture hook: the rest of the unit's forward is not needed."""


def is_weighted(module: nn.Module) -> bool:
    """A layer whose weight post-merge quantization solves: Conv2d / Linear, float or quantized."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and (isinstance(module, WEIGHTED) or hasattr(module, "weight_quantizer"))


@torch.no_grad()
def layers_in_call_order(unit: nn.Module, sample: Tensor) -> list[nn.Module]:
    """The weighted layers of ``unit`` in the order of their first call on ``sample``."""
    order: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda module, _: order.append(module) if module not in order else None)
               for m in unit.modules() if is_weighted(m)]
    try:
        unit(sample)
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def capture_input(unit: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """The input of ``layer`` when ``unit`` runs on ``x`` (the unit stops right there)."""
    box: list[Tensor] = []

    def hook(_: nn.Module, args: tuple) -> None:
        box.append(args[0])
        raise _Captured

    handle = layer.register_forward_pre_hook(hook)
    try:
        unit(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not box:
        raise ConfigError(f"{type(layer).__name__} inside a reconstruction unit was not called by it; a model's "
                          "reconstruction_units() must contain the layers they run.")
    return box[0]


@dataclass
class LayerSolve:
    """One solved layer, as ``layers.json`` records it."""

    name: str
    rows: int
    columns: int
    bits: int | None
    tokens: list[int]
    live_columns: int
    mu: float
    gptq: GptqInfo | None
    objective: dict[str, float]
    expert_error: dict  # {merged, relaxation, solution: per task; deployed_input: {merged, solution}}

    def record(self) -> dict:
        info = self.gptq
        return {"layer": self.name, "rows": self.rows, "columns": self.columns, "bits": self.bits,
                "tokens": self.tokens, "live_columns": self.live_columns,
                "mu": None if math.isinf(self.mu) else self.mu,
                "damp_used": None if info is None else info.damp_used,
                "fallback": None if info is None else info.fallback,
                "gptq_loss": None if info is None else info.loss,
                "dead_columns": None if info is None else info.dead_columns,
                "objective": self.objective, "expert_error": self.expert_error}


class PostMergeQuantizer:
    """Quantizes ``deployed`` (the merged model, its weight quantizers still without a range; a float model when
    ``quantize`` is false: the relaxation W*) unit by unit against ``experts``.

    ``merged``: the merged float model (its weights are W_m); ``base``: the model the task vectors start from
    (for an anchor blend other than 1; None otherwise); ``calibration``: one tensor of input images per task (the
    experts' order). ``on_unit`` is called after each finished unit (the stage checkpoints there).
    """

    def __init__(self, deployed: nn.Module, merged: nn.Module, experts: Sequence[nn.Module],
                 calibration: Sequence[Tensor], method: PmqMethod, quantize: bool = True, grid: str = "minmax",
                 base: nn.Module | None = None, anchor_blend: float = 1.0, device: torch.device | None = None,
                 chunk: int = 128) -> None:
        if len(experts) != len(calibration):
            raise ValueError(f"{len(experts)} experts but {len(calibration)} calibration sets")
        if anchor_blend != 1.0 and base is None:
            raise ConfigError("an anchor blend other than 1 needs the base model (the merge's source).")
        self.device = device or torch.device("cpu")
        self.deployed = deployed.to(self.device).eval()
        self.merged = {name: m for name, m in merged.named_modules() if is_weighted(m)}
        self.experts = [e.to(self.device).eval() for e in experts]
        self.base = None if base is None else {name: m for name, m in base.named_modules() if is_weighted(m)}
        self.calibration, self.method, self.quantize, self.grid = list(calibration), method, quantize, grid
        self.anchor_blend, self.chunk = anchor_blend, chunk
        if not walks_as_chain(self.deployed):
            raise ConfigError(
                f"post-merge quantization walks a chain of units; {type(self.deployed).__name__} does not declare "
                "reconstruction_chain = True (its units do not compose to its forward, e.g. the segmentation "
                "network's heads). Quantize such a model with hdrq quantize, or declare a chain.")
        self.units = reconstruction_units(self.deployed)
        self.expert_units = [[unit for _, unit in reconstruction_units(e)] for e in self.experts]
        self.walker = UnitWalker([u for _, u in self.units], [u for _, u in self.units], self.deployed, chunk=chunk)
        self.names = {id(m): name for name, m in self.deployed.named_modules()}
        self.with_expert = method.needs_statistics and method.input_mix > 0

    # -- streams -----------------------------------------------------------------------------------------------
    def _forward(self, unit: nn.Module, x: Tensor) -> Tensor:
        budget = CacheBudget(cache_budget_bytes(self.device, "auto", None))
        return self.walker.run(unit, x, budget, keep=True, device=self.device)[0]

    def streams_at(self, index: int) -> tuple[list[Tensor], list[Tensor]]:
        """Deployed and expert inputs of unit ``index``, walked from the calibration images (a resumed run)."""
        deployed, experts = list(self.calibration), list(self.calibration)
        for k in range(index):
            deployed, experts = self._advance(k, deployed, experts)
        return deployed, experts

    def _advance(self, k: int, deployed: list[Tensor], experts: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        unit = self.units[k][1]
        new_deployed = [self._forward(unit, x) for x in deployed]
        new_experts = ([self._forward(self.expert_units[t][k], x) for t, x in enumerate(experts)]
                       if self.with_expert else new_deployed)
        return new_deployed, new_experts

    # -- the run -----------------------------------------------------------------------------------------------
    def run(self, start: int = 0, on_unit: Callable[[int, list[LayerSolve]], None] | None = None
            ) -> list[LayerSolve]:
        if start == 0:
            for module in self.deployed.modules():
                if hasattr(module, "weight_quantizer"):
                    module.weight_quantizer.set_mode("float")  # not yet solved: the unit runs them in float
        deployed, experts = self.streams_at(start)
        solved: list[LayerSolve] = []
        for k in range(start, len(self.units)):
            unit = self.units[k][1]
            unit_rows = []
            for layer in layers_in_call_order(unit, deployed[0][:1].to(self.device)):
                unit_rows.append(self._solve(k, unit, layer, deployed, experts))
            solved += unit_rows
            if k + 1 < len(self.units):
                deployed, experts = self._advance(k, deployed, experts)
            if on_unit is not None:
                on_unit(k, unit_rows)
        return solved

    def _moments(self, k: int, unit: nn.Module, layer: nn.Module, name: str, deployed: list[Tensor],
                 experts: list[Tensor], affine: bool) -> list[TaskMoments]:
        columns = layer.weight[0].numel()
        out = []
        for t, x in enumerate(deployed):
            moments = TaskMoments(columns, affine, self.with_expert, self.device)
            expert_unit = self.expert_units[t][k]
            expert_layer = self.experts[t].get_submodule(name)
            for start in range(0, len(x), self.chunk):
                rows = layer_rows(layer, capture_input(unit, layer, x[start:start + self.chunk].to(self.device)))
                expert_rows = None
                if self.with_expert:
                    e = experts[t][start:start + self.chunk].to(self.device)
                    expert_rows = layer_rows(expert_layer, capture_input(expert_unit, expert_layer, e))
                moments.add(rows, expert_rows)
            out.append(moments)
        return out

    def _weights(self, source: nn.Module, affine: bool) -> Tensor:
        w = source.weight.detach().flatten(1).double().to(self.device)
        if affine:
            w = torch.cat([w, source.bias.detach().double().to(self.device)[:, None]], 1)
        return w

    @torch.no_grad()
    def _solve(self, k: int, unit: nn.Module, layer: nn.Module, deployed: list[Tensor], experts: list[Tensor]
               ) -> LayerSolve:
        name = self.names[id(layer)]
        quantizer = getattr(layer, "weight_quantizer", None)
        if self.quantize and quantizer is None:
            raise ConfigError(f"layer {name} has no weight quantizer: quantize the merged model first.")
        affine = self.method.affine and layer.bias is not None
        merged = self._weights(self.merged[name], affine)
        rows, columns = layer.weight.shape[0], layer.weight[0].numel()
        target_weight, hessian, mu, moments, objective = merged, None, 0.0, [], {}
        expert_error: dict = {}
        if self.method.needs_statistics:
            moments = self._moments(k, unit, layer, name, deployed, experts, affine)
            expert_weights = [self._weights(e.get_submodule(name), affine) for e in self.experts]
            anchor = merged
            if self.anchor_blend != 1.0:
                base = self._weights(self.base[name], affine)
                anchor = base + self.anchor_blend * (merged - base)
            target = self.method.target(moments, expert_weights, merged, anchor)
            target_weight, hessian, mu = target.weight, target.hessian, target.mu
        info = None
        if not self.quantize:
            solution = target_weight
        else:
            solution, info = self._round(layer, quantizer, target_weight, hessian, frozen=int(affine))
        layer.weight.copy_(solution[:, :columns].reshape(layer.weight.shape).to(layer.weight.dtype))
        if affine:
            layer.bias.copy_(solution[:, columns].to(layer.bias.dtype))
        if quantizer is not None and self.quantize:
            quantizer.set_mode("nearest")
        if moments:
            obj = target.objective
            objective = {"merged": obj.value(merged), "relaxation": obj.value(target_weight),
                         "solution": obj.value(solution)}
            expert_error = {"merged": obj.relative_errors(merged), "relaxation": obj.relative_errors(target_weight),
                            "solution": obj.relative_errors(solution),
                            "deployed_input": {"merged": deployed_input_errors(moments, expert_weights, merged),
                                               "solution": deployed_input_errors(moments, expert_weights, solution)}}
        live = int((torch.diagonal(sum(m.S for m in moments)) > 0).sum()) if moments else columns
        return LayerSolve(name, rows, columns, quantizer.bits if (quantizer is not None and self.quantize) else None,
                          [m.count for m in moments], live, mu, info, objective, expert_error)

    def _round(self, layer: nn.Module, quantizer, target_weight: Tensor, hessian: Tensor | None, frozen: int
               ) -> tuple[Tensor, GptqInfo | None]:
        """The grid fitted on the target's weight columns, then GPTQ (or round-to-nearest) onto it."""
        columns = target_weight.shape[1] - frozen
        quantizer.init_range(target_weight[:, :columns].float().reshape(layer.weight.shape), search=self.grid)
        scale = quantizer.effective_scale().reshape(-1).to(self.device)
        zero_point = quantizer.zero_point.reshape(-1).to(self.device)
        if scale.numel() == 1:  # a per-tensor grid
            scale = scale.expand(len(target_weight))
            zero_point = zero_point.expand(len(target_weight))
        grid = Grid(scale.double(), zero_point.double(), quantizer.qmin, quantizer.qmax)
        if self.method.solver == "rtn" or hessian is None:
            return round_to_nearest(target_weight.double(), grid, frozen), None
        p = self.method.gptq
        q, info = gptq_quantize(target_weight.float(), hessian, grid, p.block_size, p.damp, p.act_order,
                                p.damp_retries, frozen=frozen)
        return q.double(), info
