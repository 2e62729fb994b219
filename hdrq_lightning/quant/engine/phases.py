"""Entering and leaving a unit: its calibration cache, the quantizers' modes, activation ranges, the param groups
it trains (one per unit and kind in one optimizer), and at its end the weights fixed on their grids."""

from __future__ import annotations

import logging
from typing import Any

import torch

from hdrq_lightning.quant.cache import CacheBudget, UnitCache, cache_budget_bytes
from hdrq_lightning.quant.engine.plan import Phase, trains_activations, trains_weights
from hdrq_lightning.quant.modules import activation_quantizers, calibrate_activations, quant_layers

log = logging.getLogger("hdrq")


class PhaseMixin:
    """Unit entry and exit of ``ReconstructionModule`` (quant/engine/module.py)."""

    def set_unit_modes(self, weight: str | None = None, activation: str | None = None) -> None:
        """Quantization modes of the current unit (the noise switch calls this; a repeat is free)."""
        if self._applied_modes == (weight, activation):
            return
        self._applied_modes = (weight, activation)
        self._mode_version += 1  # a new set of modes is a new CUDA graph
        unit = self.quant_units[self.phase.unit]
        if weight is not None and trains_weights(self.phase.pass_name):
            for _, layer in self.current_layers():
                layer.weight_quantizer.set_mode(weight)
        if activation is not None and trains_activations(self.phase.pass_name):
            for _, quantizer in activation_quantizers(unit):
                quantizer.set_mode(activation)

    @torch.no_grad()
    def _prepare_cache(self, phase: Phase) -> UnitCache:
        self._cache = None  # the walker keeps the last cache (carried forward, then let go)
        budget = CacheBudget(cache_budget_bytes(self.device, self.runtime.cache_device, self.runtime.cache_budget_gib),
                             fixed=self.runtime.cache_budget_gib is not None)
        self._cache = self.walker.cache(phase.unit, phase.pass_name, self.calibration, budget, self.device)
        if self.runtime.compile:
            # the compiled step does not specialise on the calibration size: compile_ahead's worker compiles the
            # same graphs on a small calibration set, and other calibration sizes reuse them
            for name in self._cache.names:
                torch._dynamo.maybe_mark_dynamic(self._cache.tensor(name), 0)
        if self._cache.host_names:
            log.info("unit %s: %s kept in host memory (over the cache budget)", self.unit_names[phase.unit],
                     ", ".join(self._cache.host_names))
        return self._cache

    def _final_activation_mode(self, pass_name: str) -> str:
        quantizes_activations = any(trains_activations(p) for p in self.recipe.passes[
            : self.recipe.passes.index(pass_name) + 1])
        return "nearest" if quantizes_activations else "float"

    def _enter_phase(self) -> None:
        phase = self.phase
        recipe = self.recipe
        # Every unit in its deterministic state for this pass; the current one gets its training modes below.
        act_mode = self._final_activation_mode(phase.pass_name)
        for _, quantizer in activation_quantizers(self.quant_model):
            quantizer.set_drop(0.0)
            quantizer.set_mode(act_mode if bool(quantizer.initialized) else "float")
        cache = self._prepare_cache(phase)
        unit = self.quant_units[phase.unit]
        self._reseed(phase.start, salt=1)  # calibration subsamples activations: same draw on every (re)run
        if trains_activations(phase.pass_name):
            quantizers = [q for _, q in activation_quantizers(unit)]
            if any(not bool(q.initialized) for q in quantizers):
                leaves = [cache.tensor(name) for name in cache.input_names("quant_input")]
                chunks = ([leaf[start : start + recipe.batch_size].to(self.device, non_blocking=True)
                           for leaf in leaves] for start in range(0, len(cache), recipe.batch_size))
                calibrate_activations(unit, chunks, search=recipe.init_search, forward=cache.run)
            local = self._local_slice()
            for quantizer in quantizers:
                quantizer.set_mode("nearest")
                # the quantizers train, the models stay in eval mode (a dropout layer of the head must not drop)
                quantizer.set_drop(recipe.drop_prob, (recipe.batch_size, local.start, local.stop),
                                   kernel=self.runtime.mask_kernel)
        if trains_weights(phase.pass_name):
            for _, layer in self.unit_layers[phase.unit]:
                layer.weight_quantizer.set_mode(self.rounding.training_mode)
        self._active = self.active_groups(phase)
        self._optimizer.only = (phase.unit, self.trained_kinds(phase))
        if self._graphs_enabled():
            for group in self._optimizer.param_groups:  # (a checkpoint's groups may come without it)
                group["capturable"] = True
        for group in self._active:
            for param in group["params"]:
                param.requires_grad_(True)
                state = self._optimizer.state.get(param, {})
                if self._graphs_enabled() and "step" in state:  # a resumed unit: the step count on the device
                    state["step"] = state["step"].to(self.device, torch.float32)
            if self._graphs_enabled():
                # the captured Adam step reads its lr from a device tensor that the schedule updates in place
                value = float(group["lr"])
                group["lr"] = torch.tensor(value, device=self.device)
                self._lr_values[id(group["lr"])] = value
        self._release_graph()
        self._applied_modes, self._mode_version = None, self._mode_version + 1
        self._entered = phase
        log.info("reconstruction %s: unit %s (%d/%d), pass %s, %d iterations", self.recipe.method,
                 self.unit_names[phase.unit], phase.unit + 1, len(self.quant_units), phase.pass_name,
                 phase.iters)

    def active_groups(self, phase: Phase) -> list[dict[str, Any]]:
        """The optimizer's param groups trained in ``phase``."""
        if phase == self._entered:
            return self._active
        kinds = self.trained_kinds(phase)
        return [g for g in self._optimizer.param_groups if g["unit"] == phase.unit and g["kind"] in kinds]

    @staticmethod
    def trained_kinds(phase: Phase) -> frozenset[str]:
        """The kinds of param groups trained in ``phase``'s pass."""
        kinds = set()
        if trains_weights(phase.pass_name):
            kinds |= {"weight", "weight_scale"}
        if trains_activations(phase.pass_name):
            kinds.add("activation_scale")
        return frozenset(kinds)

    def _param_groups(self) -> list[dict[str, Any]]:
        """One param group per (unit, kind): a single optimizer, so Lightning counts and checkpoints it."""
        recipe, groups = self.recipe, []
        for unit_index, unit in enumerate(self.quant_units):
            candidates = self.rounding.param_groups(self.unit_layers[unit_index])
            if recipe.activation.learn_scale:
                candidates.append(("activation_scale", [q.scale for _, q in activation_quantizers(unit)],
                                   recipe.activation.lr, recipe.activation.schedule))
            for kind, params, lr, schedule in candidates:
                if params:
                    groups.append({"params": params, "lr": lr, "initial_lr": lr, "schedule": schedule,
                                   "unit": unit_index, "kind": kind})
        return groups

    @torch.no_grad()
    def _finish_phase(self, phase: Phase) -> None:
        unit = self.quant_units[phase.unit]
        if trains_weights(phase.pass_name):
            for _, layer in self.unit_layers[phase.unit]:
                quantizer = layer.weight_quantizer
                self.rounding.finish(layer)
                # A finished unit holds its dequantized integers; "nearest" reproduces them exactly.
                layer.weight.copy_(quantizer(layer.weight))
                quantizer.set_mode("nearest")
        if trains_activations(phase.pass_name):
            for _, quantizer in activation_quantizers(unit):
                quantizer.set_drop(0.0)
                quantizer.set_mode("nearest")
        self._release_graph()
        self._lr_values.clear()
        for group in self.active_groups(phase):
            group["lr"] = float(group["lr"])
            for param in group["params"]:
                param.requires_grad_(False)
                param.grad = None
                self._optimizer.state.pop(param, None)  # Adam moments of a finished unit are never used again
        self._active = []

    def finalize(self) -> None:
        """Deterministic quantized model: weights on their grids, activation quantizers on where trained."""
        act_mode = self._final_activation_mode(self.recipe.passes[-1])
        for _, layer in quant_layers(self.quant_model):
            layer.weight_quantizer.set_mode("nearest")
        for _, quantizer in activation_quantizers(self.quant_model):
            quantizer.set_drop(0.0)
            quantizer.set_mode(act_mode if bool(quantizer.initialized) else "float")
        self.quant_model.eval()
