"""One block-reconstruction engine; BRECQ, QDrop and HDRQ are recipes of it (see :mod:`recipe`).

The network is split into units (stem, residual blocks, head). For each unit, in order, the engine caches the
calibration set's FP inputs, the inputs produced by the already-quantized prefix, and the FP targets; it then
minimises the unit's output error by manual optimization. When a unit is done its quantized outputs become the
next unit's quantized inputs (carried forward, never re-running the prefix). All loop state (iteration, quantizer
parameters, the current optimizer) lives in the checkpoint, and each step reseeds the RNG from (seed, iteration),
so a run killed mid-block resumes at the same block and iteration and ends with the same result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from hdrq_lightning.errors import ArtifactError
from hdrq_lightning.quant.blocks import reconstruction_blocks
from hdrq_lightning.quant.modules import activation_quantizers, calibrate_activations, quant_layers
from hdrq_lightning.quant.recipe import Recipe, Runtime

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
class _BlockCache:
    pass_name: str
    block: int
    fp_input: torch.Tensor
    quant_input: torch.Tensor
    fp_target: torch.Tensor


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
        self.fp_blocks = [unit for _, unit in reconstruction_blocks(fp_model)]
        named_units = reconstruction_blocks(quant_model)
        self.block_names = [name for name, _ in named_units]
        self.quant_blocks = [unit for _, unit in named_units]
        self.block_layers = self._layers_per_block()
        self.plan = build_plan(recipe, len(self.quant_blocks))
        self.total_iters = sum(phase.iters for phase in self.plan)
        self.loss_terms: dict[str, Callable[[list[tuple[str, nn.Module]]], torch.Tensor | None]] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._cache: _BlockCache | None = None
        self._entered: Phase | None = None
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

    @property
    def finished(self) -> bool:
        return self._step >= self.total_iters

    @property
    def phase(self) -> Phase:
        step = min(self._step, self.total_iters - 1)
        return next(p for p in reversed(self.plan) if p.start <= step)

    @property
    def phase_iteration(self) -> int:
        return self._step - self.phase.start

    def current_layers(self) -> list[tuple[str, nn.Module]]:
        return self.block_layers[self.phase.block]

    def set_block_modes(self, weight: str | None = None, activation: str | None = None) -> None:
        """Quantization modes of the current unit (the noise switch calls this)."""
        block = self.quant_blocks[self.phase.block]
        if weight is not None and _trains_weights(self.phase.pass_name):
            for _, layer in self.current_layers():
                layer.weight_quantizer.set_mode(weight)
        if activation is not None and _trains_activations(self.phase.pass_name):
            for _, quantizer in activation_quantizers(block):
                quantizer.set_mode(activation)

    # ------------------------------------------------------------------------------------------- caching
    @torch.no_grad()
    def _run(self, block: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        outputs = [block(chunk) for chunk in inputs.split(self.cache_batch_size)]
        return torch.cat(outputs)

    @torch.no_grad()
    def _prepare_cache(self, phase: Phase) -> _BlockCache:
        was_training = self.quant_model.training
        self.quant_model.eval()
        previous = self._cache
        if previous is not None and previous.pass_name == phase.pass_name and previous.block == phase.block - 1:
            fp_input = previous.fp_target
            quant_input = self._run(self.quant_blocks[phase.block - 1], previous.quant_input)
        else:
            fp_input = quant_input = self.calibration
            for block in range(phase.block):
                fp_input = self._run(self.fp_blocks[block], fp_input)
                quant_input = self._run(self.quant_blocks[block], quant_input)
        fp_target = self._run(self.fp_blocks[phase.block], fp_input)
        self.quant_model.train(was_training)
        self._cache = _BlockCache(phase.pass_name, phase.block, fp_input, quant_input, fp_target)
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
            quantizer.drop_prob = 0.0
            quantizer.set_mode(act_mode if bool(quantizer.initialized) else "float")
        cache = self._prepare_cache(phase)
        block = self.quant_blocks[phase.block]
        self._reseed(phase.start, salt=1)  # calibration subsamples activations: same draw on every (re)run
        if _trains_activations(phase.pass_name):
            quantizers = [q for _, q in activation_quantizers(block)]
            if any(not bool(q.initialized) for q in quantizers):
                calibrate_activations(block, cache.quant_input.split(recipe.batch_size), search=recipe.init_search)
            for quantizer in quantizers:
                quantizer.set_mode("nearest")
                quantizer.drop_prob = recipe.drop_prob
        if _trains_weights(phase.pass_name):
            mode = "adaround" if recipe.weight.rounding == "adaround" else "nearest"
            for _, layer in self.block_layers[phase.block]:
                layer.weight_quantizer.set_mode(mode)
        for group in self.active_groups(phase):
            for param in group["params"]:
                param.requires_grad_(True)
        self._entered = phase
        log.info("reconstruction %s: unit %s (%d/%d), pass %s, %d iterations", self.recipe.method,
                 self.block_names[phase.block], phase.block + 1, len(self.quant_blocks), phase.pass_name,
                 phase.iters)

    def active_groups(self, phase: Phase) -> list[dict[str, Any]]:
        """The optimizer's param groups trained in ``phase``."""
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
                quantizer.drop_prob = 0.0
                quantizer.set_mode("nearest")
        for group in self.active_groups(phase):
            for param in group["params"]:
                param.requires_grad_(False)
                param.grad = None
                self._optimizer.state.pop(param, None)  # Adam moments of a finished unit are never used again

    def finalize(self) -> None:
        """Deterministic quantized model: weights on their grids, activation quantizers on where trained."""
        act_mode = self._final_activation_mode(self.recipe.passes[-1])
        for _, layer in quant_layers(self.quant_model):
            layer.weight_quantizer.set_mode("nearest")
        for _, quantizer in activation_quantizers(self.quant_model):
            quantizer.drop_prob = 0.0
            quantizer.set_mode(act_mode if bool(quantizer.initialized) else "float")
        self.quant_model.eval()

    # ------------------------------------------------------------------------------------------- training
    def train_dataloader(self) -> DataLoader:
        # Each Lightning epoch is `checkpoint_every` engine iterations; the batches carry no data (the
        # calibration cache lives in the module), they only drive the loop.
        return DataLoader(range(self.recipe.checkpoint_every), batch_size=None)

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

    def _adaround_schedule(self, phase: Phase, iteration: int) -> tuple[float, float]:
        """(weight, beta) of the AdaRound regulariser: off for the warmup, then beta decays linearly to its end."""
        recipe = self.recipe
        start, end = recipe.adaround_beta
        warmup = recipe.adaround_warmup * phase.iters
        if recipe.weight.rounding != "adaround" or not _trains_weights(phase.pass_name) or iteration < warmup:
            return 0.0, start
        progress = (iteration - warmup) / max(1.0, phase.iters - warmup)
        return recipe.adaround_reg_weight, end + (start - end) * max(0.0, 1.0 - progress)

    def _unit_loss(self, block: int, pass_name: str, inputs: torch.Tensor, target: torch.Tensor,
                   reg_weight: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction error of one unit plus its regularisers (what the fast path compiles)."""
        output = self.quant_blocks[block](inputs)
        reconstruction = (output - target).pow(2).sum(dim=1).mean()
        loss = reconstruction
        layers = self.block_layers[block]
        if self.recipe.weight.rounding == "adaround" and _trains_weights(pass_name) and layers:
            penalty = torch.stack([layer.weight_quantizer.adaround_regularizer(beta) for _, layer in layers]).sum()
            loss = loss + reg_weight * penalty
        for term in self.loss_terms.values():
            extra = term(layers)
            if extra is not None:
                loss = loss + extra
        return loss, reconstruction

    def _loss_fn(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """Eager ``_unit_loss``, or its compiled form on the fast path (CUDA graphs with runtime.cuda_graphs)."""
        if not self.runtime.compile:
            return self._unit_loss
        if self._compiled_loss is None:
            # one compiled variant per unit and mode: raise dynamo's per-function recompilation limit
            import torch._dynamo.config as dynamo_config

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
            mode = "reduce-overhead" if self.runtime.cuda_graphs else None
            self._compiled_loss = torch.compile(self._unit_loss, mode=mode, dynamic=False)
        return self._compiled_loss

    def _reseed(self, iteration: int, salt: int = 0) -> None:
        """Every random draw of the engine is a function of (seed, iteration): resumes replay them exactly."""
        torch.manual_seed((self.seed * 1_000_003 + iteration) * 2 + salt)

    def _world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _batch(self, phase: Phase) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch: inputs (mixed as the recipe says) and FP targets.

        Every rank draws the same global indices and mixing mask, so N ranks with batch B/N each compute
        exactly the gradient of one device with batch B.
        """
        cache = self._cache
        indices = torch.randint(len(cache.fp_target), (self.recipe.batch_size,), device=cache.fp_target.device)
        inputs = cache.quant_input[indices]
        p = self.recipe.input_quant_prob if _trains_activations(phase.pass_name) else 1.0
        if p < 1.0:
            mask = torch.rand(inputs.shape, device=inputs.device) < p  # logical order: layout-independent
            inputs = torch.where(mask, inputs, cache.fp_input[indices])
        world, rank = self._world()
        local = torch.arange(len(indices), device=indices.device).tensor_split(world)[rank]
        return inputs[local], cache.fp_target[indices[local]]

    def reconstruction_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration on the current unit: sample, forward, loss, backward, update. Returns (loss, error)."""
        phase, iteration = self.phase, self.phase_iteration
        if self._entered != phase:
            raise RuntimeError(f"reconstruction phase {phase} was not entered before its first step")
        self._reseed(self._step)
        inputs, target = self._batch(phase)
        reg_weight, beta = self._adaround_schedule(phase, iteration)
        self.adaround_weight.fill_(reg_weight)  # device scalars: a new value is no new graph
        self.adaround_beta.fill_(beta)
        if self.runtime.compile and self.runtime.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, reconstruction = self._loss_fn()(phase.block, phase.pass_name, inputs, target,
                                               self.adaround_weight, self.adaround_beta)
        self._update(loss, phase)
        loss, reconstruction = loss.detach().clone(), reconstruction.detach().clone()
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
            self._sync_gradients(phase)
        optimizer.step()

    def start(self) -> None:
        """Prepare to be driven without a Trainer: build the optimizer and enter the current unit."""
        self.configure_optimizers()
        if not self.finished:
            self._enter_phase()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.finished:
            return None
        block, step = self.phase.block, self._step
        loss, reconstruction = self.reconstruction_step()
        if step % self.runtime.log_every == 0:
            self.log("quantize/train/reconstruction", reconstruction, prog_bar=True)
            self.log("quantize/train/block", float(block), prog_bar=True)
        return loss

    def _sync_gradients(self, phase: Phase) -> None:
        if self.trainer.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
            return
        for group in self.active_groups(phase):
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("reconstruction")
        if state is None or state["recipe"] != self.recipe.to_dict():
            raise ArtifactError(
                "the reconstruction checkpoint was written with a different quant recipe; resume with the same "
                "quant settings, or start over with force=true."
            )
        self._step = int(state["step_count"])
        self._entered = None
