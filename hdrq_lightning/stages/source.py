"""Stage `source`: train the SHOT network on the labelled source domain."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from hdrq_lightning.adapt.source_module import SourceModule
from hdrq_lightning.artifacts import save_weights
from hdrq_lightning.evaluation import evaluate_domains
from hdrq_lightning.models.build import architecture
from hdrq_lightning.models.io import model_metadata
from hdrq_lightning.stages.common import (
    build_datamodule,
    build_model,
    build_task,
    build_trainer,
    instantiate_plugin,
    notice,
    resume_path,
    stage_run,
    start_fresh_if_forced,
    step_checkpoint,
)


def run_source(cfg: DictConfig) -> dict:
    dm = build_datamodule(cfg)
    run = stage_run(cfg, "source", dm.source)
    if not start_fresh_if_forced(cfg, run):
        return run.metrics()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg, dm.num_classes)  # a bad checkpoint path fails here, before the run dir exists
    if cfg.source.get("_target_"):
        return run_source_plugin(cfg, dm, run, model)
    run.prepare(cfg)
    hp = cfg.source
    module = SourceModule(model, dm.num_classes, lr=hp.lr, backbone_lr_mult=hp.backbone_lr_mult,
                          momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov,
                          label_smoothing=hp.label_smoothing, lr_gamma=hp.lr_gamma, lr_power=hp.lr_power)
    dm.configure(fit=(dm.source, "train"), evaluate=[(dm.source, "val")])
    best = ModelCheckpoint(dirpath=run.checkpoint_dir, filename="best", monitor="source/val/acc", mode="max",
                           save_top_k=1, save_last=True, save_on_train_epoch_end=False)
    trainer = build_trainer(cfg, run, "source", tags=["source"], checkpoint=best, max_epochs=hp.epochs)
    trainer.fit(module, datamodule=dm, ckpt_path=resume_path(run, f"source/{dm.source}"))
    # SHOT keeps the best epoch on the held-out 10% of the source domain.
    state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    save_weights(model.state_dict(), run.weights_path, model_metadata(
        "fp", architecture(cfg.model, dm.num_classes), stage="source", domain=dm.source))
    metrics = {
        "stage": "source", "domain": dm.source,
        "best_val_acc": round(100.0 * float(best.best_model_score), 4),
        "test_acc": evaluate_domains(model, dm, [dm.source, *dm.targets], task=build_task(cfg))["per_domain"],
    }
    notice.info("source %s: test accuracy %s", dm.source, metrics["test_acc"])
    return run.finish(metrics)


def run_source_plugin(cfg: DictConfig, dm, run, model) -> dict:
    """A source-training plug-in (``conf/source/*.yaml`` with ``_target_``): a LightningModule built from
    ``(model=, dm=)`` that serves its own training data and says how many ``iterations`` it runs."""
    module = instantiate_plugin(cfg.source, "source", model=model, dm=dm)
    run.prepare(cfg)
    trainer = build_trainer(cfg, run, "source", tags=["source"], max_steps=module.iterations,
                            max_epochs=module.epochs, limit_val_batches=0, num_sanity_val_steps=0,
                            checkpoint=step_checkpoint(run.checkpoint_dir, cfg.source.get("checkpoint_every", 50)))
    if module.iterations > 0:  # 0: the shared start (initial weights) without training
        trainer.fit(module, ckpt_path=resume_path(run, f"source/{dm.source}"))
    save_weights(model.state_dict(), run.weights_path, model_metadata(
        "fp", architecture(cfg.model, dm.num_classes), stage="source", domain=dm.source))
    task = build_task(cfg)
    metrics = {"stage": "source", "domain": dm.source, "metric": task.metric_name,
               "test_acc": evaluate_domains(model, dm, [d for d in (dm.source, *dm.targets)
                                                         if dm.has_split(d, "test")], task=task)["per_domain"]}
    notice.info("source %s: test %s %s", dm.source, task.metric_name, metrics["test_acc"])
    return run.finish(metrics)
