"""The CUDA-graph path: the whole step of a unit (batch gather, mixing and masks, forward, loss, backward,
gradient all-reduce, fused Adam with its learning rate in a device tensor) captured once per unit and set of
quantization modes, after ``graph_warmup`` eager steps on a side stream, then replayed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hdrq_lightning.quant.engine.plan import Phase


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



class GraphMixin:
    """The captured step of ``ReconstructionModule`` (quant/engine/module.py)."""

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
        if self.runtime.adam_kernel:
            self._optimizer.kernel_step()
        else:
            self._optimizer.step()
        return loss.detach(), reconstruction.detach()

    def _graph_step(self, phase: Phase) -> tuple[torch.Tensor, torch.Tensor]:
        """One step through the unit's CUDA graph: ``graph_warmup`` eager steps on a side stream, then capture."""
        key = (phase.unit, self._mode_version)
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
