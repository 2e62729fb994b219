"""Stage `quantize`: BN folding + block reconstruction of every adapted expert (one per target domain)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from hdrq_lightning.artifacts import QUANTIZED_FILE
from hdrq_lightning.callbacks import engine_callbacks
from hdrq_lightning.callbacks.compile_ahead import CompileAheadCallback
from hdrq_lightning.callbacks.compile_bundles import CompileBundlesCallback
from hdrq_lightning.callbacks.progress import StageProgress
from hdrq_lightning.callbacks.wall_clock import WallClock
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.evaluation import evaluate_domains
from hdrq_lightning.gpus import data_parallel
from hdrq_lightning.models.build import architecture
from hdrq_lightning.models.io import model_metadata, save_model_file
from hdrq_lightning.quant.distributed import reconstruction_trainer_arguments
from hdrq_lightning.quant.export import export_integer_state
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import quantize_model
from hdrq_lightning.quant.recipe import Recipe, Runtime
from hdrq_lightning.quant.reconstruction import ReconstructionModule
from hdrq_lightning.report import wandb_run
from hdrq_lightning.stages.common import (
    build_datamodule,
    build_task,
    build_trainer,
    load_model,
    notice,
    require_finished,
    resume_path,
    stage_run,
    start_fresh_if_forced,
)


def run_quantize(cfg: DictConfig) -> dict:
    dm = build_datamodule(cfg)
    recipe = Recipe.from_config(cfg.quant)
    source_run = stage_run(cfg, "source", dm.source)
    require_finished(source_run, cfg, "quantize")
    source_folded = fold_batch_norm(load_model(cfg, dm.num_classes, distance_anchor(cfg, source_run)))
    results = {}
    for target in dm.targets:
        adapt_run = stage_run(cfg, "adapt", target)
        require_finished(adapt_run, cfg, "quantize")
        results[target] = quantize_one(cfg, dm, recipe, source_folded, adapt_run.weights_path, target)
    return results


def distance_anchor(cfg: DictConfig, source_run) -> Path:
    """The weights HDRQ's distance term pulls towards (``quant.distance_anchor``): ``source``, the source stage's
    model (the experts' shared start: a source-trained network for SHOT, the ImageNet-initialised network for
    HRDA's ``source=seg_init`` and the supervised game model of ``streets``), or a local weight file of the same
    architecture (e.g. a GTA-trained source model, or the official code's HRDA_ResNet101_Backbone_PT)."""
    anchor = str(cfg.quant.get("distance_anchor", "source"))
    if anchor == "source":
        return source_run.weights_path
    path = Path(anchor).expanduser()
    if not path.is_file():
        raise ConfigError(f"quant.distance_anchor={anchor!r} is neither 'source' nor an existing weight file; give "
                          "source (the source stage's model) or the path of a .safetensors/.pt state dict of the "
                          "same network.")
    return path


def quantize_one(cfg: DictConfig, dm, recipe: Recipe, source_folded: torch.nn.Module, expert_weights,
                 target: str) -> dict:
    run = stage_run(cfg, "quantize", recipe.tag, target)
    if not start_fresh_if_forced(cfg, run):
        return run.metrics()
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    fp_model = fold_batch_norm(load_model(cfg, dm.num_classes, expert_weights))
    quant_model = quantize_model(fp_model, recipe.numerics())
    run.prepare(cfg)
    task = build_task(cfg)
    calibration = task.calibration_inputs(torch.cat([images for images, _, _ in dm.calibration_loader(
        target, size=cfg.quant.calibration_size, batch_size=recipe.batch_size)]))
    runtime = Runtime.from_config(cfg.quant.get("runtime"))
    runtime.apply_precision()
    module = ReconstructionModule(fp_model, quant_model, calibration, recipe, seed=cfg.seed, runtime=runtime)
    clock = WallClock(started)
    source_weights = {k: v for k, v in source_folded.state_dict().items() if k.endswith("weight")}
    callbacks = [*engine_callbacks(recipe, source_weights), clock,
                 CompileAheadCallback(architecture(cfg.model, dm.num_classes)),
                 CompileBundlesCallback(runtime.compile_bundles)]
    progress = StageProgress(f"quantize {recipe.tag}/{target}", total=lambda trainer, engine: engine.total_iters,
                             describe=lambda engine: engine.progress())
    trainer = build_trainer(cfg, run, "quantize", tags=[recipe.method, f"w{recipe.w_bits}a{recipe.a_bits}", target],
                            callbacks=callbacks, progress=progress, max_epochs=math.ceil(module.total_iters / recipe.checkpoint_every),
                            num_sanity_val_steps=0, limit_val_batches=0,
                            **reconstruction_trainer_arguments(data_parallel(cfg.trainer)))
    trainer.fit(module, ckpt_path=resume_path(run, f"quantize/{recipe.tag}/{target}"))
    if trainer.global_rank != 0:
        return {}
    module.finalize()
    fp_result = evaluate_domains(fp_model, dm, [target], task=task)
    quant_result = evaluate_domains(quant_model, dm, [target], task=task)
    fp_acc, quant_acc = fp_result["per_domain"][target], quant_result["per_domain"][target]
    per_class = {} if "per_class" not in quant_result else {  # segmentation: IoU per class on the own target
        "fp_per_class": fp_result["per_class"][target], "quant_per_class": quant_result["per_class"][target]}
    save_model_file(export_integer_state(quant_model.cpu()), run.dir / QUANTIZED_FILE, model_metadata(
        "quantized", architecture(cfg.model, dm.num_classes), recipe.numerics(), method=recipe.method,
        target=target))
    seconds = round(clock.total_seconds(), 2)
    wandb = wandb_run(cfg, run.dir, "quantize", f"quantize/{recipe.tag}/{target}",
                      [recipe.method, f"w{recipe.w_bits}a{recipe.a_bits}", target])  # the Trainer's run, continued
    if wandb is not None:
        wandb.log({"quantize/test/fp_acc": fp_acc, "quantize/test/quant_acc": quant_acc,
                   "quantize/seconds": seconds})
        wandb.finish()
    unit = "%" if task.metric_name == "accuracy" else f" {task.metric_name}"
    notice.info("quantize %s %s: FP %.2f%s, quantized %.2f%s (%.1fs)", recipe.tag, target, fp_acc, unit, quant_acc,
                unit, seconds)
    return run.finish({"stage": "quantize", "method": recipe.method, "w_bits": recipe.w_bits,
                       "a_bits": recipe.a_bits, "target": target,
                       "metric": task.metric_name, "fp_acc": fp_acc, "quant_acc": quant_acc, **per_class,
                       "seconds": seconds,
                       "iterations": module.total_iters, "device": str(trainer.strategy.root_device),
                       "recipe": recipe.to_dict()})
