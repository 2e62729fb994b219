"""One block-reconstruction engine; BRECQ, QDrop and HDRQ are recipes of it (see :mod:`recipe`).

The network is split into units (stem, residual blocks, head). For each unit, in order, the engine caches the
calibration set's FP inputs, the inputs produced by the already-quantized prefix, and the FP targets; it then
minimises the unit's output error by manual optimization. When a unit is done its quantized outputs become the
next unit's quantized inputs (carried forward, never re-running the prefix). All loop state (iteration, quantizer
parameters, the current optimizer) lives in the checkpoint, and each step reseeds the RNG from (seed, iteration),
so a run killed mid-block resumes at the same block and iteration and ends with the same result.

Fast path (``quant.runtime``): ``compile`` fuses each unit's loss with Inductor; ``cuda_graphs`` captures the whole
step of a unit (batch gather, mixing and masks, forward, loss, backward, gradient all-reduce, fused Adam with its
learning rate in a device tensor) in one CUDA graph per unit and quantization mode, so a step costs one graph
launch. The schedules run on the host before each step (``step_hooks``) and write device scalars in place; the
RNG is reseeded per step before the replay, and graph replays read the generator's seed and offset, so eager and
graph steps draw the same random numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from hdrq_lightning.errors import ArtifactError, ConfigError
from hdrq_lightning.quant.cache import CacheBudget, UnitCache, cache_budget_bytes
from hdrq_lightning.quant.facts import reconstruction_units, walks_as_chain
from hdrq_lightning.quant.hooks import LossTerm
from hdrq_lightning.quant.modules import activation_quantizers, calibrate_activations, quant_layers
from hdrq_lightning.quant.quantizers import batch_uniforms
from hdrq_lightning.quant.recipe import Recipe, Runtime
from hdrq_lightning.quant.walker import CaptureWalker, UnitWalker

log = logging.getLogger("hdrq")


@dataclass(frozen=True)
class Phase:
    """One unit trained in one pass: global iterations [start, start + iters)."""

    pass_name: str
    block: int
    iters: int
    start: int


def build_plan(recipe: Recipe, num_blocks: int) -> list[Phase]:
    plan, start = [], 0
    for pass_name in recipe.passes:
        for block in range(num_blocks):
            iters = recipe.phase_iters(pass_name)
            plan.append(Phase(pass_name, block, iters, start))
            start += iters
    return plan


@dataclass
class _StepGraph:
    """The captured step of one unit in one set of quantization modes, with its static inputs and outputs."""

    key: tuple[int, int]
    indices: torch.Tensor
    warm_steps: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    static: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None


def _trains_weights(pass_name: str) -> bool:
    return pass_name in ("joint", "weights")


def _trains_activations(pass_name: str) -> bool:
    return pass_name in ("joint", "activations")


class ReconstructionModule(L.LightningModule):
    """Block reconstruction of ``quant_model`` towards ``fp_model`` (both BN-folded, same architecture)."""

    def __init__(self, fp_model: nn.Module, quant_model: nn.Module, calibration: torch.Tensor, recipe: Recipe,
                 seed: int = 0, cache_batch_size: int = 256, runtime: Runtime | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.recipe = recipe
        self.runtime = runtime or Runtime()
        self._compiled_loss: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        self.seed = seed
        self.cache_batch_size = cache_batch_size
        self.fp_model = fp_model.eval().requires_grad_(False)
        self.quant_model = quant_model.requires_grad_(False)
        if self.runtime.channels_last:
            calibration = calibration.contiguous(memory_format=torch.channels_last)
            self.fp_model.to(memory_format=torch.channels_last)
            self.quant_model.to(memory_format=torch.channels_last)
        self.register_buffer("calibration", calibration, persistent=False)
        # The iteration counter lives on the host (no device sync or write per step); checkpoints carry it.
        self._step = 0
        self.register_buffer("adaround_weight", torch.zeros(()), persistent=False)
        self.register_buffer("adaround_beta", torch.zeros(()), persistent=False)
        fp_units = reconstruction_units(fp_model, recipe.units)
        named_units = reconstruction_units(quant_model, recipe.units)
        self.fp_blocks = [unit for _, unit in fp_units]
        self.block_names = [name for name, _ in named_units]
        self.quant_blocks = [unit for _, unit in named_units]
        self.block_layers = self._layers_per_block()
        if walks_as_chain(fp_model):
            self.walker = UnitWalker(self.fp_blocks, self.quant_blocks, self.quant_model, cache_batch_size,
                                     self.runtime.channels_last)
        else:  # any graph: each unit's call captured on a forward of the whole model
            self.walker = CaptureWalker(self.fp_model, self.quant_model, fp_units, named_units, cache_batch_size,
                                        self.runtime.channels_last)
        self.plan = build_plan(recipe, len(self.quant_blocks))
        self.total_iters = sum(phase.iters for phase in self.plan)
        self.loss_terms: dict[str, LossTerm] = {}  # added by callbacks (HDRQ's distance regulariser)
        # Called before every engine iteration (lr schedule, noise switch), whatever drives the loop.
        self.step_hooks: dict[str, Callable[[ReconstructionModule], None]] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._cache: UnitCache | None = None
        self._entered: Phase | None = None
        self._phase_index = 0
        self._active: list[dict[str, Any]] = []
        self._applied_modes: tuple[str | None, str | None] | None = None
        self._mode_version = 0
        self._scalars: dict[str, float] = {}
        self._lr_values: dict[int, float] = {}  # last value written to each device lr tensor
        self._graph: _StepGraph | None = None
        # (world size, rank) when no Trainer drives the engine: the compile-ahead twin of a DDP rank takes its
        # rank's slice of the global batch, so that it compiles that rank's graphs
        self.standalone_world = (1, 0)
        if self.recipe.checkpoint_every % self.runtime.steps_per_batch:
            raise ConfigError(f"quant.checkpoint_every ({recipe.checkpoint_every}) must be a multiple of "
                              f"quant.runtime.steps_per_batch ({self.runtime.steps_per_batch}).")
        if recipe.weight.rounding == "adaround":
            for _, layer in quant_layers(self.quant_model):
                layer.weight_quantizer.init_adaround(layer.weight.detach())

    # ----------------------------------------------------------------------------------------------- state
    def _layers_per_block(self) -> list[list[tuple[str, nn.Module]]]:
        names = {id(module): name for name, module in quant_layers(self.quant_model)}
        return [[(names[id(m)], m) for m in block.modules() if id(m) in names] for block in self.quant_blocks]

    @property
    def iteration(self) -> int:
        """Global engine iteration (over all units and passes)."""
        return self._step

    def seek(self, iteration: int, enter: bool = False) -> None:
        """Continue from global ``iteration``: the next step enters that iteration's unit and pass, with caches built
        from the model as it stands (a compile-ahead twin that needs only the units left; a benchmark timing one
        unit). ``enter``: build the unit's caches now rather than in the next step (a benchmark times it apart).
        A resumed run seeks through its checkpoint."""
        if not 0 <= iteration <= self.total_iters:
            raise ValueError(f"iteration {iteration} is outside [0, {self.total_iters}]")
        self._step, self._entered = int(iteration), None
        if enter:
            self._cache = None
            self.walker.forget()
            self._enter_phase()

    @property
    def cache(self) -> UnitCache | None:
        """The current unit's calibration tensors (FP input, quantized input, FP target), once entered."""
        return self._cache

    @property
    def finished(self) -> bool:
        return self._step >= self.total_iters

    @property
    def phase(self) -> Phase:
        step = min(self._step, self.total_iters - 1)
        phase = self.plan[self._phase_index]
        if not phase.start <= step < phase.start + phase.iters:  # moved on, or jumped (resume, benchmarks)
            self._phase_index = next(i for i in reversed(range(len(self.plan))) if self.plan[i].start <= step)
            phase = self.plan[self._phase_index]
        return phase

    @property
    def phase_iteration(self) -> int:
        return self._step - self.phase.start

    def progress(self) -> tuple[int, str]:
        """(iterations done over all units and passes, where the engine is) for progress displays."""
        phase = self.phase
        return self._step, (f"unit {phase.block + 1}/{len(self.quant_blocks)} {self.block_names[phase.block]}, "
                            f"{phase.pass_name} {min(self._step - phase.start, phase.iters)}/{phase.iters}")

    def current_layers(self) -> list[tuple[str, nn.Module]]:
        return self.block_layers[self.phase.block]

    def set_block_modes(self, weight: str | None = None, activation: str | None = None) -> None:
        """Quantization modes of the current unit (the noise switch calls this; a repeat is free)."""
        if self._applied_modes == (weight, activation):
            return
        self._applied_modes = (weight, activation)
        self._mode_version += 1  # a new set of modes is a new CUDA graph
        block = self.quant_blocks[self.phase.block]
        if weight is not None and _trains_weights(self.phase.pass_name):
            for _, layer in self.current_layers():
                layer.weight_quantizer.set_mode(weight)
        if activation is not None and _trains_activations(self.phase.pass_name):
            for _, quantizer in activation_quantizers(block):
                quantizer.set_mode(activation)

    # ------------------------------------------------------------------------------------------- caching
    @torch.no_grad()
    def _prepare_cache(self, phase: Phase) -> UnitCache:
        self._cache = None  # the walker keeps the last cache (carried forward, then let go)
        budget = CacheBudget(cache_budget_bytes(self.device, self.runtime.cache_device, self.runtime.cache_budget_gib),
                             fixed=self.runtime.cache_budget_gib is not None)
        self._cache = self.walker.cache(phase.block, phase.pass_name, self.calibration, budget, self.device)
        if self.runtime.compile:
            # the compiled step does not specialise on the calibration size: compile_ahead's worker compiles the
            # same graphs on a small calibration set, and other calibration sizes reuse them
            for name in self._cache.names:
                torch._dynamo.maybe_mark_dynamic(self._cache.tensor(name), 0)
        if self._cache.host_names:
            log.info("unit %s: %s kept in host memory (over the cache budget)", self.block_names[phase.block],
                     ", ".join(self._cache.host_names))
        return self._cache

    # ------------------------------------------------------------------------------------------- phases
    def _final_activation_mode(self, pass_name: str) -> str:
        quantizes_activations = any(_trains_activations(p) for p in self.recipe.passes[
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
        block = self.quant_blocks[phase.block]
        self._reseed(phase.start, salt=1)  # calibration subsamples activations: same draw on every (re)run
        if _trains_activations(phase.pass_name):
            quantizers = [q for _, q in activation_quantizers(block)]
            if any(not bool(q.initialized) for q in quantizers):
                leaves = [cache.tensor(name) for name in cache.input_names("quant_input")]
                chunks = ([leaf[start : start + recipe.batch_size].to(self.device, non_blocking=True)
                           for leaf in leaves] for start in range(0, len(cache), recipe.batch_size))
                calibrate_activations(block, chunks, search=recipe.init_search, forward=cache.run)
            local = self._local_slice()
            for quantizer in quantizers:
                quantizer.set_mode("nearest")
                # the quantizers train, the models stay in eval mode (a dropout layer of the head must not drop)
                quantizer.set_drop(recipe.drop_prob, (recipe.batch_size, local.start, local.stop))
        if _trains_weights(phase.pass_name):
            mode = "adaround" if recipe.weight.rounding == "adaround" else "nearest"
            for _, layer in self.block_layers[phase.block]:
                layer.weight_quantizer.set_mode(mode)
        self._active = self.active_groups(phase)
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
                 self.block_names[phase.block], phase.block + 1, len(self.quant_blocks), phase.pass_name,
                 phase.iters)

    def active_groups(self, phase: Phase) -> list[dict[str, Any]]:
        """The optimizer's param groups trained in ``phase``."""
        if phase == self._entered:
            return self._active
        kinds = set()
        if _trains_weights(phase.pass_name):
            kinds |= {"weight", "weight_scale"}
        if _trains_activations(phase.pass_name):
            kinds.add("activation_scale")
        return [g for g in self._optimizer.param_groups if g["block"] == phase.block and g["kind"] in kinds]

    def _param_groups(self) -> list[dict[str, Any]]:
        """One param group per (unit, kind): a single optimizer, so Lightning counts and checkpoints it."""
        recipe, groups = self.recipe, []
        for block_index, block in enumerate(self.quant_blocks):
            layers = self.block_layers[block_index]
            candidates: list[tuple[str, list[torch.Tensor], float, str]] = []
            if recipe.weight.rounding == "adaround":
                candidates.append(("weight", [layer.weight_quantizer.alpha for _, layer in layers], recipe.weight.lr,
                                   recipe.weight.schedule))
            elif recipe.weight.rounding == "latent":
                candidates.append(("weight", [layer.weight for _, layer in layers], recipe.weight.lr, recipe.weight.schedule))
                if recipe.weight.learn_scale:
                    candidates.append(("weight_scale", [layer.weight_quantizer.scale for _, layer in layers],
                                       recipe.weight.scale_lr, recipe.weight.schedule))
            if recipe.activation.learn_scale:
                candidates.append(("activation_scale", [q.scale for _, q in activation_quantizers(block)],
                                   recipe.activation.lr, recipe.activation.schedule))
            for kind, params, lr, schedule in candidates:
                if params:
                    groups.append({"params": params, "lr": lr, "initial_lr": lr, "schedule": schedule,
                                   "block": block_index, "kind": kind})
        return groups

    @torch.no_grad()
    def _finish_phase(self, phase: Phase) -> None:
        block = self.quant_blocks[phase.block]
        if _trains_weights(phase.pass_name):
            for _, layer in self.block_layers[phase.block]:
                quantizer = layer.weight_quantizer
                if self.recipe.weight.rounding == "adaround":
                    quantizer.harden(layer.weight)  # fix the rounding: floor + (alpha >= 0)
                else:
                    quantizer.set_mode("nearest")
                # A finished unit holds its dequantized integers; "nearest" reproduces them exactly.
                layer.weight.copy_(quantizer(layer.weight))
                quantizer.set_mode("nearest")
        if _trains_activations(phase.pass_name):
            for _, quantizer in activation_quantizers(block):
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

    # ------------------------------------------------------------------------------------------- training
    def train_dataloader(self) -> DataLoader:
        # Each Lightning epoch is `checkpoint_every` engine iterations (`steps_per_batch` per batch); the batches
        # carry no data (the calibration cache lives in the module), they only drive the loop.
        return DataLoader(range(self.recipe.checkpoint_every // self.runtime.steps_per_batch), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = self._param_groups()
        if not groups:
            # Nothing learnable (e.g. round-to-nearest weights, fixed activation steps): a placeholder keeps
            # the loop uniform.
            groups = [{"params": [torch.zeros((), device=self.device, requires_grad=True)],
                       "lr": 0.0, "initial_lr": 0.0, "schedule": "constant", "block": -1, "kind": "none"}]
        fused = self.runtime.fused_optimizer and self.device.type == "cuda"
        self._optimizer = torch.optim.Adam(groups, fused=fused or None)
        return self._optimizer

    def on_train_start(self) -> None:
        if not self.finished:
            self._enter_phase()

    def set_lr(self, group: dict[str, Any], lr: float) -> None:
        """Set a param group's learning rate (in place, and only when it changes, for a captured step's device
        tensor)."""
        current = group["lr"]
        if not isinstance(current, torch.Tensor):
            group["lr"] = lr
        elif self._lr_values.get(id(current)) != lr:
            current.fill_(lr)
            self._lr_values[id(current)] = lr

    def _set_scalar(self, name: str, value: float) -> None:
        """Write a device scalar read by the step (a new value is no new graph); skipped when unchanged."""
        if self._scalars.get(name) != value:
            getattr(self, name).fill_(value)
            self._scalars[name] = value

    def _adaround_schedule(self, phase: Phase, iteration: int) -> tuple[float, float]:
        """(weight, beta) of the AdaRound regulariser: off for the warmup, then beta decays linearly to its end."""
        recipe = self.recipe
        start, end = recipe.adaround_beta
        warmup = recipe.adaround_warmup * phase.iters
        if recipe.weight.rounding != "adaround" or not _trains_weights(phase.pass_name) or iteration < warmup:
            return 0.0, start
        progress = (iteration - warmup) / max(1.0, phase.iters - warmup)
        return recipe.adaround_reg_weight, end + (start - end) * max(0.0, 1.0 - progress)

    def _unit_loss(self, unit: nn.Module, layers: list[nn.Module], extras: dict[str, list[torch.Tensor | None]],
                   pass_name: str, inputs: torch.Tensor | tuple[tuple[Any, ...], dict[str, Any]],
                   target: torch.Tensor, reg_weight: torch.Tensor, beta: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction error of one unit plus AdaRound's regulariser and the loss terms on its ``layers``.

        ``inputs``: the unit's input tensor, or its call ``(args, kwargs)`` for a unit with several inputs."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.runtime.bf16):
            output = unit(inputs) if isinstance(inputs, torch.Tensor) else unit(*inputs[0], **inputs[1])
        reconstruction = (output.float() - target).pow(2).sum(dim=1).mean()
        loss = reconstruction
        if self.recipe.weight.rounding == "adaround" and _trains_weights(pass_name) and layers:
            penalty = torch.stack([layer.weight_quantizer.adaround_regularizer(beta) for layer in layers]).sum()
            loss = loss + reg_weight * penalty
        for name, term in self.loss_terms.items():
            extra = term.penalty(layers, extras[name])
            if extra is not None:
                loss = loss + extra
        return loss, reconstruction

    def _loss_fn(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """Eager ``_batch_loss``, or its Inductor-compiled form (runtime.compile)."""
        if not self.runtime.compile:
            return self._batch_loss
        if self._compiled_loss is None:
            # one compiled variant per unit shape and mode: raise dynamo's per-function recompilation limit
            import torch._dynamo.config as dynamo_config

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
            self._compiled_loss = torch.compile(self._batch_loss, dynamic=False)
        return self._compiled_loss

    def _reseed(self, iteration: int, salt: int = 0) -> None:
        """Every random draw of the engine is a function of (seed, iteration): resumes replay them exactly."""
        torch.manual_seed((self.seed * 1_000_003 + iteration) * 2 + salt)

    def world(self) -> tuple[int, int]:
        """(number of ranks, this rank): the Trainer's, or ``standalone_world`` when driven without one."""
        if self._trainer is None:
            return self.standalone_world
        return self.trainer.world_size, self.trainer.global_rank

    # The global batch: every rank draws the same indices and mixing mask and computes its slice, so N ranks
    # with batch B/N each compute exactly the gradient of one device with batch B.
    def _draw_indices(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.randint(len(self._cache), (self.recipe.batch_size,), device=self.device, out=out)

    def _local_slice(self) -> slice:
        """This rank's rows of the global batch (torch.tensor_split's division: the first ranks get one more)."""
        world, rank = self.world()
        size, extra = divmod(self.recipe.batch_size, world)
        start = rank * size + min(rank, extra)
        return slice(start, start + size + (rank < extra))

    def _mixes(self, pass_name: str) -> bool:
        return _trains_activations(pass_name) and self.recipe.input_quant_prob < 1.0

    def _needed(self, pass_name: str) -> list[str]:
        cache = self._cache
        return [*cache.input_names("quant_input"), "fp_target",
                *(cache.input_names("fp_input") if self._mixes(pass_name) else [])]

    def _host_rows(self, pass_name: str, indices: torch.Tensor,
                   static: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This rank's rows of the host-resident cache tensors, on the device (into ``static`` when given)."""
        names = [name for name in self._needed(pass_name) if not self._cache.on_device(name)]
        if not names:
            return {}
        local = indices[self._local_slice()].to("cpu")  # one sync per step, only with a host-resident cache
        return {name: self._cache.gather_host(name, local, out=None if static is None else static.get(name))
                for name in names}

    def _batch(self, pass_name: str, indices: torch.Tensor, host_rows: dict[str, torch.Tensor], local: slice
               ) -> tuple[torch.Tensor | tuple[tuple[Any, ...], dict[str, Any]], torch.Tensor]:
        """This rank's slice ``local`` of the global batch: inputs (mixed as the recipe says) and FP targets.

        A unit with several inputs gets each mixed with its own mask, in leaf order, and its call rebuilt."""
        cache = self._cache
        rows = {name: host_rows[name] if name in host_rows else cache.gather_device(name, indices[local])
                for name in self._needed(pass_name)}
        leaves = [rows[name] for name in cache.input_names("quant_input")]
        if self._mixes(pass_name):
            # drawn for the global batch in logical order: layout- and world-size-independent
            batch_rows = (self.recipe.batch_size, local.start, local.stop)
            for i, fp_name in enumerate(cache.input_names("fp_input")):
                mask = batch_uniforms(batch_rows, tuple(leaves[i].shape[1:]), leaves[i].device) \
                    < self.recipe.input_quant_prob
                leaves[i] = torch.where(mask, leaves[i], rows[fp_name])
        inputs = leaves[0] if cache.spec is None else cache.call(leaves)
        return inputs, rows["fp_target"]

    def _batch_loss(self, unit: nn.Module, layers: list[nn.Module], extras: dict[str, list[torch.Tensor | None]],
                    pass_name: str, indices: torch.Tensor, host_rows: dict[str, torch.Tensor], local: slice,
                    reg_weight: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch and loss of one step: what runtime.compile compiles (gather, mixing, quantizers, regularisers fuse).

        The unit, its layers and the loss terms' tensors are arguments, not looked up by index or name, so dynamo
        guards on their structure and shapes rather than on which unit it is: units of the same shape (the 2nd to
        last blocks of every ResNet stage) share one compiled graph; a ResNet-50 compiles 10 per mode, not 18.
        """
        inputs, target = self._batch(pass_name, indices, host_rows, local)
        return self._unit_loss(unit, layers, extras, pass_name, inputs, target, reg_weight, beta)

    def _step_loss(self, phase: Phase, indices: torch.Tensor, host_rows: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, reconstruction error) of one step on the current unit (``_batch_loss``, compiled or eager)."""
        named = self.block_layers[phase.block]
        extras = {name: term.prepare(named) for name, term in self.loss_terms.items()}
        return self._loss_fn()(self.quant_blocks[phase.block], [layer for _, layer in named], extras,
                               phase.pass_name, indices, host_rows, self._local_slice(), self.adaround_weight,
                               self.adaround_beta)

    def reconstruction_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration on the current unit: sample, forward, loss, backward, update. Returns (loss, error).

        On the CUDA-graph path the returned tensors are the graph's static outputs: read (or clone) them before
        the next step.
        """
        phase = self.phase
        if self._entered != phase:
            raise RuntimeError(f"reconstruction phase {phase} was not entered before its first step")
        for hook in self.step_hooks.values():
            hook(self)
        reg_weight, beta = self._adaround_schedule(phase, self._step - phase.start)
        self._set_scalar("adaround_weight", reg_weight)
        self._set_scalar("adaround_beta", beta)
        self._reseed(self._step)
        if self._graphs_enabled():
            loss, reconstruction = self._graph_step(phase)
        else:
            indices = self._draw_indices()
            loss, reconstruction = self._step_loss(phase, indices, self._host_rows(phase.pass_name, indices))
            self._update(loss, phase)
            loss, reconstruction = loss.detach(), reconstruction.detach()
        self._step += 1
        if self._step >= phase.start + phase.iters:
            self._finish_phase(phase)
            if not self.finished:
                self._enter_phase()
        return loss, reconstruction

    def _update(self, loss: torch.Tensor, phase: Phase) -> None:
        if self._trainer is None:  # driven directly (benchmarks, notebooks)
            self._optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            self._optimizer.step()
            return
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            self.manual_backward(loss)
            self._sync_gradients()
        optimizer.step()

    # ------------------------------------------------------------------------------------------- CUDA graphs
    def _graphs_enabled(self) -> bool:
        return self.runtime.cuda_graphs and self.device.type == "cuda"

    def _release_graph(self) -> None:
        """Drop the captured step (its memory pool returns to the allocator with the gradients it owned)."""
        if self._graph is not None and self._graph.graph is not None and self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)
        self._graph = None

    def _graph_body(self, phase: Phase, graph: _StepGraph) -> tuple[torch.Tensor, torch.Tensor]:
        """What one captured step does: gather and mix the batch, loss, backward, all-reduce, Adam."""
        loss, reconstruction = self._step_loss(phase, graph.indices, graph.static)
        if loss.requires_grad:
            loss.backward()
            self._sync_gradients()
        self._optimizer.step()
        return loss.detach(), reconstruction.detach()

    def _graph_step(self, phase: Phase) -> tuple[torch.Tensor, torch.Tensor]:
        """One step through the unit's CUDA graph: ``graph_warmup`` eager steps on a side stream, then capture."""
        key = (phase.block, self._mode_version)
        graph = self._graph
        if graph is None or graph.key != key:
            self._release_graph()
            indices = torch.empty(self.recipe.batch_size, dtype=torch.long, device=self.device)
            graph = self._graph = _StepGraph(key, indices)
        # Outside the graph: the indices (the eager path's first draw, so the RNG streams agree) and the rows of
        # host-resident cache tensors, copied into the graph's static inputs.
        self._draw_indices(out=graph.indices)
        graph.static.update(self._host_rows(phase.pass_name, graph.indices, graph.static))
        if graph.graph is None and graph.warm_steps < self.runtime.graph_warmup:
            graph.warm_steps += 1
            self._optimizer.zero_grad(set_to_none=True)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss, reconstruction = self._graph_body(phase, graph)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._count_optimizer_step()
            return loss, reconstruction
        if graph.graph is None:
            # Gradients must be allocated inside the graph, so that every replay writes the same tensors.
            self._optimizer.zero_grad(set_to_none=True)
            graph.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph.graph):  # records the step without running it
                graph.loss, graph.reconstruction = self._graph_body(phase, graph)
        graph.graph.replay()
        self._count_optimizer_step()
        return graph.loss, graph.reconstruction

    def _count_optimizer_step(self) -> None:
        """Keep Lightning's step count (the loggers' x axis) right for steps run outside ``LightningOptimizer``."""
        if self._trainer is None:
            return
        optimizer = self.optimizers()
        optimizer._on_before_step()
        optimizer._on_after_step()

    def start(self) -> None:
        """Prepare to be driven without a Trainer: build the optimizer and enter the current unit."""
        self.configure_optimizers()
        if not self.finished:
            self._enter_phase()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss = logged = None
        for _ in range(self.runtime.steps_per_batch):
            if self.finished:
                break
            block, step = self.phase.block, self._step
            loss, reconstruction = self.reconstruction_step()
            if step % self.runtime.log_every == 0:
                logged = (block, reconstruction.clone())
        if logged is not None:
            self.log("quantize/train/reconstruction", logged[1], prog_bar=True)
            self.log("quantize/train/block", float(logged[0]), prog_bar=True)
        return None if loss is None else loss.clone()

    def _sync_gradients(self) -> None:
        """Average the current unit's gradients over the ranks (DDP), where the engine's manual step needs it."""
        if self._trainer is None or self.trainer.world_size <= 1 or not dist.is_available() \
                or not dist.is_initialized():
            return
        for group in self._active:
            for param in group["params"]:
                if param.grad is not None:
                    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                    param.grad /= self.trainer.world_size

    def on_train_end(self) -> None:
        if self.finished:
            self.finalize()

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reconstruction"] = {"recipe": self.recipe.to_dict(), "step_count": self._step}
        # A captured step's lr lives in a device tensor: store plain numbers (the groups saved are copies)
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                if isinstance(group.get("lr"), torch.Tensor):
                    group["lr"] = float(group["lr"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("reconstruction")
        # (checkpoints from before quant.units existed were written with its default)
        if state is None or {"units": "layer", **state["recipe"]} != self.recipe.to_dict():
            raise ArtifactError(
                "the reconstruction checkpoint was written with a different quant recipe; resume with the same "
                "quant settings, or start over with force=true."
            )
        self._step = int(state["step_count"])
        self._entered = None
