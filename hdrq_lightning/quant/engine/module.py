"""One block-reconstruction engine; BRECQ, QDrop and HDRQ are recipes of it (see :mod:`recipe`).

The network is split into units (stem, residual blocks, head). For each unit, in order, the engine caches the
calibration set's FP inputs, the inputs produced by the already-quantized prefix, and the FP targets; it then
minimises the unit's output error by manual optimization. When a unit is done its quantized outputs become the
next unit's quantized inputs (carried forward, never re-running the prefix). All loop state (iteration, quantizer
parameters, the current optimizer) lives in the checkpoint, and each step reseeds the RNG from (seed, iteration),
so a run killed mid-unit resumes at the same unit and iteration and ends with the same result.

Fast path (``quant.runtime``): ``compile`` fuses each unit's loss with Inductor; ``cuda_graphs`` captures the whole
step of a unit (batch gather, mixing and masks, forward, loss, backward, gradient all-reduce, fused Adam with its
learning rate in a device tensor) in one CUDA graph per unit and quantization mode, so a step costs one graph
launch. The schedules run on the host before each step (``step_hooks``) and write device scalars in place; the
RNG is reseeded per step before the replay, and graph replays read the generator's seed and offset, so eager and
graph steps draw the same random numbers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from hdrq_lightning.errors import ArtifactError, ConfigError
from hdrq_lightning.quant import kernels
from hdrq_lightning.quant.cache import UnitCache
from hdrq_lightning.quant.engine.graphs import GraphMixin, _StepGraph
from hdrq_lightning.quant.engine.phases import PhaseMixin
from hdrq_lightning.quant.engine.plan import Phase, build_plan
from hdrq_lightning.quant.engine.rounding import rounding_plugin
from hdrq_lightning.quant.engine.step import StepMixin
from hdrq_lightning.quant.facts import reconstruction_units, walks_as_chain
from hdrq_lightning.quant.hooks import LossTerm
from hdrq_lightning.quant.modules import quant_layers
from hdrq_lightning.quant.recipe import Recipe, Runtime
from hdrq_lightning.quant.walker import CaptureWalker, UnitWalker

log = logging.getLogger("hdrq")


class UnitAdam(torch.optim.Adam):
    """Adam that steps and zeroes only the groups of the unit being reconstructed (``only = (unit, kinds)``, set
    when a unit is entered; a finished unit's gradients are set to None by the engine).

    The engine keeps one optimizer with a group per (unit, kind), so that Lightning counts and checkpoints one; the
    other units' groups hold no gradients and Adam would skip them, but looking at each costs host time at every
    step (tens of microseconds a group, 36 groups for a ResNet-50, against a few milliseconds per eager step on an
    H200). The result is the same as stepping all groups. The groups are picked by their ``unit`` and ``kind``
    keys, not held, so a checkpoint's state loaded into the optimizer (new group dicts) is picked the same way."""

    only: tuple[int, frozenset[str]] | None = None  # (unit, kinds) of the groups to step; None: all

    @contextmanager
    def _only_current(self) -> Iterator[None]:
        groups = self.param_groups
        if self.only is not None:
            unit, kinds = self.only
            self.param_groups = [g for g in groups if g.get("unit") == unit and g.get("kind") in kinds]
        try:
            yield
        finally:
            self.param_groups = groups

    def step(self, closure=None):  # type: ignore[override]
        with self._only_current():
            return super().step(closure)

    def kernel_step(self) -> None:
        """The same update by ``kernels.adam_update``, one Triton kernel per tensor (what a captured step runs:
        torch's fused Adam keeps most SMs idle on a unit's few small tensors). Groups or tensors it does not take
        (amsgrad, maximize, a float learning rate, other dtypes or layouts) go through ``step``."""
        with self._only_current():
            if not all(self._kernel_group(group) for group in self.param_groups):
                super().step()
                return
            updates = []
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    state = self.state[param]
                    if not state:  # what torch's Adam creates for a fused or capturable step
                        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    if not kernels.adam_update_supported(param, param.grad, state["exp_avg"], state["exp_avg_sq"]):
                        super().step()
                        return
                    updates.append((group, param, state))
            if not updates:
                return
            torch._foreach_add_([state["step"] for _, _, state in updates], 1.0)
            for group, param, state in updates:
                beta1, beta2 = group["betas"]
                kernels.adam_update(param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                    group["lr"], beta1, beta2, group["eps"], group["weight_decay"])

    @staticmethod
    def _kernel_group(group: dict[str, Any]) -> bool:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        return (isinstance(lr, torch.Tensor) and lr.is_cuda and lr.numel() == 1 and 0 < beta1 < 1 and 0 < beta2 < 1
                and not group.get("amsgrad") and not group.get("maximize") and not group.get("differentiable")
                and not isinstance(beta1, torch.Tensor) and not isinstance(beta2, torch.Tensor))

    def zero_grad(self, set_to_none: bool = True) -> None:
        with self._only_current():
            super().zero_grad(set_to_none)


class ReconstructionModule(StepMixin, PhaseMixin, GraphMixin, L.LightningModule):
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
        # the rounding plug-in's penalty weight and temperature, device scalars a captured step reads
        self.register_buffer("penalty_weight", torch.zeros(()), persistent=False)
        self.register_buffer("penalty_beta", torch.zeros(()), persistent=False)
        self.rounding = rounding_plugin(recipe)
        fp_units = reconstruction_units(fp_model, recipe.units)
        named_units = reconstruction_units(quant_model, recipe.units)
        self.fp_units = [unit for _, unit in fp_units]
        self.unit_names = [name for name, _ in named_units]
        self.quant_units = [unit for _, unit in named_units]
        self.unit_layers = self._layers_per_unit()
        if walks_as_chain(fp_model):
            self.walker = UnitWalker(self.fp_units, self.quant_units, self.quant_model, cache_batch_size,
                                     self.runtime.channels_last)
        else:  # any graph: each unit's call captured on a forward of the whole model
            self.walker = CaptureWalker(self.fp_model, self.quant_model, fp_units, named_units, cache_batch_size,
                                        self.runtime.channels_last)
        self.plan = build_plan(recipe, len(self.quant_units))
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
        self.rounding.prepare(list(quant_layers(self.quant_model)))

    def _layers_per_unit(self) -> list[list[tuple[str, nn.Module]]]:
        names = {id(module): name for name, module in quant_layers(self.quant_model)}
        return [[(names[id(m)], m) for m in unit.modules() if id(m) in names] for unit in self.quant_units]

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
        return self._step, (f"unit {phase.unit + 1}/{len(self.quant_units)} {self.unit_names[phase.unit]}, "
                            f"{phase.pass_name} {min(self._step - phase.start, phase.iters)}/{phase.iters}")

    def current_layers(self) -> list[tuple[str, nn.Module]]:
        return self.unit_layers[self.phase.unit]

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
                       "lr": 0.0, "initial_lr": 0.0, "schedule": "constant", "unit": -1, "kind": "none"}]
        fused = self.runtime.fused_optimizer and self.device.type == "cuda"
        self._optimizer = UnitAdam(groups, fused=fused or None)
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
        reg_weight, beta = self.rounding.schedule(phase, self._step - phase.start)
        self._set_scalar("penalty_weight", reg_weight)
        self._set_scalar("penalty_beta", beta)
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
            unit, step = self.phase.unit, self._step
            loss, reconstruction = self.reconstruction_step()
            if step % self.runtime.log_every == 0:
                logged = (unit, reconstruction.clone())
        if logged is not None:
            self.log("quantize/train/reconstruction", logged[1], prog_bar=True)
            self.log("quantize/train/unit", float(logged[0]), prog_bar=True)
        return None if loss is None else loss.clone()

    def on_train_end(self) -> None:
        if self.finished:
            self.finalize()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reconstruction"] = {"recipe": self.recipe.to_dict(), "step_count": self._step}
        # A captured step's lr lives in a device tensor: store plain numbers (the groups saved are copies)
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                if isinstance(group.get("lr"), torch.Tensor):
                    group["lr"] = float(group["lr"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("reconstruction")
        # (checkpoints from before quant.units and quant.overrides existed were written with their defaults)
        if state is None or {"units": "layer", "overrides": [], **state["recipe"]} != self.recipe.to_dict():
            raise ArtifactError(
                "the reconstruction checkpoint was written with a different quant recipe; resume with the same "
                "quant settings, or start over with force=true."
            )
        self._step = int(state["step_count"])
        self._entered = None
        for optimizer in checkpoint.get("optimizer_states", []):  # param groups saved before "unit" had its name
            for group in optimizer.get("param_groups", []):
                if "block" in group:
                    group["unit"] = group.pop("block")
