"""One engine step's batch and loss: the global batch's indices, this rank's rows (gathered on the GPU, or on the
host for caches over the budget), QDrop's input mixing per input tensor, the unit's reconstruction error plus the
rounding penalty and the loss terms, compiled with Inductor on the fast path, and the gradient update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hdrq_lightning.quant import kernels
from hdrq_lightning.quant.engine.plan import Phase, trains_activations, trains_weights
from hdrq_lightning.quant.quantizers import batch_keep_mask, mix_batch_rows


class StepMixin:
    """The batch and loss of ``ReconstructionModule`` (quant/engine/module.py)."""

    def _unit_loss(self, unit: nn.Module, layers: list[nn.Module], extras: dict[str, list[torch.Tensor | None]],
                   pass_name: str, inputs: torch.Tensor | tuple[tuple[Any, ...], dict[str, Any]],
                   target: torch.Tensor, reg_weight: torch.Tensor, beta: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction error of one unit plus AdaRound's regulariser and the loss terms on its ``layers``.

        ``inputs``: the unit's input tensor, or its call ``(args, kwargs)`` for a unit with several inputs."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.runtime.bf16):
            output = unit(inputs) if isinstance(inputs, torch.Tensor) else unit(*inputs[0], **inputs[1])
        output = output if output.dtype == torch.float32 else output.float()
        reconstruction = (output - target).pow(2).sum(dim=1).mean()
        loss = reconstruction
        if self.rounding.has_penalty and trains_weights(pass_name) and layers:
            penalty = self.rounding.penalty(layers, beta)
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
        """Every random draw of the engine is a function of (seed, iteration): resumes replay them exactly.

        Seeds the generators the engine draws from (the host's and its device's) as ``torch.manual_seed`` would,
        without its per-call work for every other backend (on a machine without a GPU it formats a stack trace
        for CUDA's lazy seeding at every step)."""
        seed = (self.seed * 1_000_003 + iteration) * 2 + salt
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)

    def world(self) -> tuple[int, int]:
        """(number of ranks, this rank): the Trainer's, or ``standalone_world`` when driven without one."""
        if self._trainer is None:
            return self.standalone_world
        return self.trainer.world_size, self.trainer.global_rank

    def _draw_indices(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.randint(len(self._cache), (self.recipe.batch_size,), device=self.device, out=out)

    def _local_slice(self) -> slice:
        """This rank's rows of the global batch (torch.tensor_split's division: the first ranks get one more)."""
        world, rank = self.world()
        size, extra = divmod(self.recipe.batch_size, world)
        start = rank * size + min(rank, extra)
        return slice(start, start + size + (rank < extra))

    def _mixes(self, pass_name: str) -> bool:
        return trains_activations(pass_name) and self.recipe.input_quant_prob < 1.0

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
        mine = indices if local.start == 0 and local.stop == len(indices) else indices[local]
        pairs = list(zip(cache.input_names("quant_input"), cache.input_names("fp_input"))) \
            if self._mixes(pass_name) else []
        batch_rows = (self.recipe.batch_size, local.start, local.stop)
        mixed = self._kernel_mixed(pairs, mine, host_rows, batch_rows) if self.runtime.mask_kernel else {}
        taken = {name for pair in pairs if pair[0] in mixed for name in pair}
        rows = {name: host_rows[name] if name in host_rows else cache.gather_device(name, mine)
                for name in self._needed(pass_name) if name not in taken}
        leaves = [mixed[name] if name in mixed else rows[name] for name in cache.input_names("quant_input")]
        for i, (quant_name, fp_name) in enumerate(pairs):
            if quant_name in mixed:
                continue
            # drawn for the global batch in logical order: layout- and world-size-independent
            mask = batch_keep_mask(batch_rows, tuple(leaves[i].shape[1:]), leaves[i].device,
                                   self.recipe.input_quant_prob, self.runtime.mask_kernel)
            if mask.stride() != leaves[i].stride():
                # the mask in the cache's layout (channels-last), so that the mixed input is in it too: where()
                # takes the layout of the logical-order mask, and a channels-last unit then transposes its input
                # (Inductor writing the gathered rows out to do so) and saves it NCHW for the backward
                mask = torch.empty_like(leaves[i], dtype=torch.bool).copy_(mask)
            leaves[i] = torch.where(mask, leaves[i], rows[fp_name])
        inputs = leaves[0] if cache.spec is None else cache.call(leaves)
        return inputs, rows["fp_target"]

    def _kernel_mixed(self, pairs: list[tuple[str, str]], mine: torch.Tensor, host_rows: dict[str, torch.Tensor],
                      batch_rows: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """QDrop's mixed inputs by one kernel each (``mix_batch_rows``, quant.runtime.mask_kernel), by quant-input
        name: straight from the device cache at ``mine``, or from the host-resident rows already brought over; a
        pair the kernel does not take (one source on each side, another layout, no CUDA) is left to the torch
        mixing."""
        mixed = {}
        for quant_name, fp_name in pairs:
            on_host = quant_name in host_rows
            if on_host != (fp_name in host_rows):
                continue
            sources = (host_rows[quant_name], host_rows[fp_name]) if on_host else \
                (self._cache.tensor(quant_name), self._cache.tensor(fp_name))
            if kernels.mix_rows_supported(*sources):
                index = torch.arange(len(mine), device=mine.device) if on_host else mine
                mixed[quant_name] = mix_batch_rows(*sources, index, batch_rows, self.recipe.input_quant_prob)
        return mixed

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
        named = self.unit_layers[phase.unit]
        extras = {name: term.prepare(named) for name, term in self.loss_terms.items()}
        return self._loss_fn()(self.quant_units[phase.unit], [layer for _, layer in named], extras,
                               phase.pass_name, indices, host_rows, self._local_slice(), self.penalty_weight,
                               self.penalty_beta)

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
