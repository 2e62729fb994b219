"""Compile the fast path's step graphs ahead of the engine, in a worker process (``quant.runtime.compile_ahead``).

``CompileAheadCallback``, added to the quantize stage's Trainer, starts the worker when the engine starts training
and stops it when training ends. A cold ``torch.compile`` of a reconstruction spends minutes in Inductor's code
generation and Triton's kernel compiler (a ResNet-50: 10 unit shapes x 2 quantization modes x forward and
backward), and each unit waits for its own graphs. What is compiled depends on the architecture, the recipe's quantizer settings, the
runtime and the tensor shapes, not on the weights or the data (the caches' calibration dimension is dynamic). So
when the engine starts training, a worker process builds the same engine on a few random calibration images, runs
two steps per unit (one per side of HDRQ's noise switch) and leaves the compiled code in the on-disk caches of
Inductor (FX graphs, AOT-autograd graphs, Triton kernels). When the engine reaches a unit, its compile is a cache
hit (dynamo tracing and loading); at the paper's 20,000 iterations per unit the worker stays ahead after the first
unit (bench/results/ has the measurements).

The worker skips what the engine compiles itself as it starts: the current unit's graph in its current mode. With
HDRQ's noise it begins with the current unit's fake-quant graph (needed at the noise switch, 3,500 iterations
before the unit's end), otherwise with the next unit.

Best effort: a worker that fails or falls behind costs only CPU time (the engine compiles what it does not find in
the cache), and it is stopped when the engine's training ends. Started only on CUDA, with ``compile`` on; the
callback is given the model's architecture config (models/build.py: modules do not pickle in general,
weight-normed layers never do). The worker builds, folds and quantizes it as the quantize stage does and loads the
engine's state dicts. Under DDP every rank starts its own
worker on its own GPU as that rank (its slice of the global batch): the ranks' graphs differ in their batch slice,
and Inductor's cache keys carry the device index. Loss terms added by callbacks (the distance regulariser) are
sent to the worker; they must pickle, or the worker is not started. A worker that starts with the engine stays
behind it while units train only for seconds (the digits benchmark): it pays off at the paper's 20,000 iterations.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("hdrq")

PAYLOAD, LOG = "payload.pt", "worker.log"


def ahead_recipe(recipe: Any) -> Any:
    """The engine's recipe cut to two iterations per unit and pass, with the noise switch between them."""
    noise = dataclasses.replace(recipe.noise, fakequant_iters=1, reference_iters=2)
    return dataclasses.replace(recipe, iters=2, act_iters=2, checkpoint_every=2, noise=noise)


def ahead_runtime(runtime: Any) -> Any:
    """Compiled, uncaptured (a captured step runs the same compiled code), caches on the device, no worker."""
    return dataclasses.replace(runtime, cuda_graphs=False, compile_ahead=False, steps_per_batch=1,
                               cache_device="device", cache_budget_gib=None)


def ahead_start(engine: Any) -> tuple[int, int] | None:
    """Where the twin starts: (phase index, iteration of the twin's 2-step phase), past the graph the engine
    compiles itself as it starts; None when nothing is left for the worker.

    The engine's current phase in its current mode is the engine's own first compile. With HDRQ's noise still
    ahead of the switch, the twin starts at its fake-quant step of that phase (its iteration 1), else at the next
    phase."""
    if engine.finished:
        return None
    index, noise = engine.plan.index(engine.phase), engine.recipe.noise
    if noise.enabled and (noise.weights or noise.activations) \
            and engine.phase_iteration < noise.switch_iteration(engine.phase.iters):
        return index, 1
    return (index + 1, 0) if index + 1 < len(engine.plan) else None


def write_payload(engine: Any, path: Path, start: tuple[int, int], model_config: Mapping[str, Any]) -> None:
    """What the worker needs to build the engine's twin: the architecture (``model_config``), models' states,
    recipe, runtime, loss terms, the rank it stands for, where to start ((phase index, iteration of the twin's
    phase): ``ahead_start``)."""
    calibration = engine.calibration
    torch.save({"model_config": dict(model_config), "fp_state": engine.fp_model.state_dict(),
                "quant_state": engine.quant_model.state_dict(), "recipe": engine.recipe,
                "runtime": engine.runtime, "loss_terms": dict(engine.loss_terms), "seed": engine.seed,
                "image_shape": tuple(calibration.shape[1:]), "dtype": calibration.dtype,
                "start": start, "world": engine.world(),
                "precision": precision_settings()}, path)


def precision_settings() -> tuple[str, Any, Any]:
    """The TF32 settings of matmuls and cuDNN, exactly: they are part of the compiled graphs' cache keys, and
    ``allow_tf32 = False`` is a different key from never set (``fp32_precision`` 'ieee' vs 'none')."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") and hasattr(cudnn, "fp32_precision") \
        else "allow_tf32"
    return name, getattr(matmul, name), getattr(cudnn, name)


def apply_precision_settings(settings: tuple[str, Any, Any]) -> None:
    name, *values = settings
    for backend, value in zip((torch.backends.cuda.matmul, torch.backends.cudnn), values):
        if getattr(backend, name) != value:
            setattr(backend, name, value)


def build_twin(path: Path, device: str, remove_payload: bool = False) -> Any:
    """The engine's twin from the payload at ``path``, started at the payload's phase and iteration.

    ``remove_payload``: delete the payload once read (the worker process does: no copy of the models is left
    in the temp directory if the engine's process is killed)."""
    from hdrq_lightning.callbacks import engine_callbacks
    from hdrq_lightning.models.build import build_model
    from hdrq_lightning.quant.fold import fold_batch_norm
    from hdrq_lightning.quant.modules import quantize_model
    from hdrq_lightning.quant.reconstruction import ReconstructionModule

    payload = torch.load(path, map_location=device, weights_only=False)
    if remove_payload:
        path.unlink()
    apply_precision_settings(payload["precision"])
    fp_model = fold_batch_norm(build_model(payload["model_config"]).eval())
    fp_model.load_state_dict(payload["fp_state"])
    quant_model = quantize_model(fp_model, payload["recipe"].numerics(), init_ranges=False)
    quant_model.load_state_dict(payload["quant_state"])
    recipe = ahead_recipe(payload["recipe"])
    # two batches of images: enough to draw from, and the caches' first dimension is not specialised on
    calibration = torch.randn(2 * recipe.batch_size, *payload["image_shape"], dtype=payload["dtype"],
                              generator=torch.Generator().manual_seed(0))
    engine = ReconstructionModule(fp_model, quant_model, calibration, recipe,
                                  seed=payload["seed"], runtime=ahead_runtime(payload["runtime"])).to(device)
    engine.loss_terms.update(payload["loss_terms"])
    engine.standalone_world = payload["world"]  # a DDP rank's twin compiles that rank's slice of the batch
    for callback in engine_callbacks(recipe):  # the step hooks; the loss terms came with the payload
        callback.attach(engine)
    phase, iteration = payload["start"]
    engine.seek(engine.plan[phase].start + iteration)  # a resumed engine needs only the units it has left
    engine.start()
    return engine


def run_worker(path: Path, device: str, remove_payload: bool = False) -> int:
    """Build the twin (``build_twin``) and step it through the units it has; returns the steps run."""
    engine = build_twin(path, device, remove_payload)
    steps = 0
    while not engine.finished:
        engine.reconstruction_step()
        steps += 1
    return steps


def graph_cache_counts() -> tuple[int, int]:
    """(hits, misses) of Inductor's FX-graph cache in this process so far (one per compiled forward/backward)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


class CompileAhead:
    """The worker process of one engine run; ``stop()`` ends it (if still running), says how many of the engine's
    graphs came from the cache, and removes its files."""

    def __init__(self, process: subprocess.Popen, folder: Path) -> None:
        self.process, self.folder = process, folder
        self.counts_at_start = graph_cache_counts()

    def stop(self) -> None:
        hits, misses = (now - then for now, then in zip(graph_cache_counts(), self.counts_at_start))
        log.info("compiled step graphs of the engine: %d loaded from the cache, %d compiled by the engine itself",
                 hits, misses)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            lines = (self.folder / LOG).read_text(errors="replace").strip().splitlines()
            log.info("compile-ahead worker stopped before it finished (last: %s)", lines[-1] if lines else "-")
        elif self.process.returncode:
            tail = (self.folder / LOG).read_text(errors="replace")[-2000:]
            log.warning("the compile-ahead worker failed (exit %d); the engine compiled its units itself:\n%s",
                        self.process.returncode, tail)
        shutil.rmtree(self.folder, ignore_errors=True)


def launch(engine: Any, model_config: Mapping[str, Any] | None) -> CompileAhead | None:
    """Start the worker for ``engine`` (at the start of its training), or None where it does not apply."""
    runtime = engine.runtime
    if not (runtime.compile and runtime.compile_ahead and engine.device.type == "cuda"):
        return None
    if model_config is None:
        log.info("no compile-ahead worker: no model config to rebuild the engine's model from")
        return None
    start = ahead_start(engine)
    if start is None:
        return None
    folder = Path(tempfile.mkdtemp(prefix="hdrq-compile-ahead-"))
    try:
        write_payload(engine, folder / PAYLOAD, start, model_config)
    except Exception as error:  # e.g. a loss term that does not pickle: run without the worker
        log.warning("compile-ahead worker not started (%s: %s); the engine compiles each unit itself",
                    type(error).__name__, error)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    device = f"cuda:{engine.device.index if engine.device.index is not None else torch.cuda.current_device()}"
    with open(folder / LOG, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", __name__, str(folder / PAYLOAD), device],
                                   stdout=output, stderr=subprocess.STDOUT)
    log.info("compile-ahead worker %d compiles the remaining units' step graphs on %s (rank %d of %d)",
             process.pid, device, engine.world()[1], engine.world()[0])
    return CompileAhead(process, folder)


class CompileAheadCallback(Callback):
    """Runs the compile-ahead worker alongside the engine's training (``launch`` / ``CompileAhead.stop``).

    Added by the quantize stage; ``model_config`` is the architecture the worker rebuilds (models/build.py).
    Callbacks run before the module's own hooks, so the worker starts from the engine's position before it enters
    its first unit, as ``ahead_start`` expects.
    """

    def __init__(self, model_config: Mapping[str, Any] | None) -> None:
        self.model_config = None if model_config is None else dict(model_config)
        self._worker: CompileAhead | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._stop()
        self._worker = launch(pl_module, self.model_config)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._stop()

    def teardown(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._stop()  # also when training ended with an exception

    def _stop(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)  # the unit starts: how far ahead the worker is
    run_worker(Path(sys.argv[1]), sys.argv[2], remove_payload=True)
