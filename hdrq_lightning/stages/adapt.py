"""Stage `adapt`: SHOT adaptation of the source model to every target domain (one expert per target)."""

from __future__ import annotations

import lightning as L
from omegaconf import DictConfig

from hdrq_lightning.adapt.shot_module import ShotModule
from hdrq_lightning.artifacts import save_weights
from hdrq_lightning.evaluation import domain_accuracy
from hdrq_lightning.models.build import architecture
from hdrq_lightning.models.io import model_metadata
from hdrq_lightning.stages.common import (
    build_datamodule,
    build_model,
    build_task,
    build_trainer,
    instantiate_plugin,
    load_model,
    notice,
    require_finished,
    resume_path,
    stage_run,
    start_fresh_if_forced,
    step_checkpoint,
)


def run_adapt(cfg: DictConfig) -> dict:
    dm = build_datamodule(cfg)
    source_run = stage_run(cfg, "source", dm.source)
    require_finished(source_run, cfg, "adapt")
    results = {}
    for target in dm.targets:
        results[target] = adapt_one(cfg, dm, source_run.weights_path, target)
    return results


def adapt_one(cfg: DictConfig, dm, source_weights, target: str) -> dict:
    run = stage_run(cfg, "adapt", target)
    if not start_fresh_if_forced(cfg, run):
        return run.metrics()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = load_model(cfg, dm.num_classes, source_weights)
    if cfg.adapt.get("_target_"):
        return adapt_plugin(cfg, dm, run, model, target)
    run.prepare(cfg)
    task = build_task(cfg)
    source_only = domain_accuracy(model, dm, target, task)
    hp = cfg.adapt
    module = ShotModule(model, dm.num_classes, pseudo_label_loader=dm.loader(target, "train"), lr=hp.lr,
                        backbone_lr_mult=hp.backbone_lr_mult, momentum=hp.momentum, weight_decay=hp.weight_decay,
                        nesterov=hp.nesterov, cls_weight=hp.cls_weight, im_weight=hp.im_weight,
                        diversity=hp.diversity, epsilon=hp.epsilon, pseudo_label_rounds=hp.pseudo_label_rounds,
                        lr_gamma=hp.lr_gamma, lr_power=hp.lr_power)
    dm.configure(fit=(target, "train"), evaluate=[(target, "test")])
    trainer = build_trainer(cfg, run, "adapt", tags=["adapt", hp.method, target], max_epochs=hp.epochs)
    trainer.fit(module, datamodule=dm, ckpt_path=resume_path(run, f"adapt/{target}"))
    adapted = domain_accuracy(model, dm, target, task)
    save_weights(model.state_dict(), run.weights_path, model_metadata(
        "fp", architecture(cfg.model, dm.num_classes), stage="adapt", domain=target))
    notice.info("adapt %s -> %s: source-only %.2f%%, adapted %.2f%%", dm.source, target, source_only, adapted)
    return run.finish({"stage": "adapt", "method": hp.method, "source": dm.source, "target": target,
                       "source_only_acc": source_only, "adapted_acc": adapted})


def adapt_plugin(cfg: DictConfig, dm, run, model, target: str) -> dict:
    """An adaptation plug-in (``conf/adapt/*.yaml`` with ``_target_``, e.g. HRDA): a LightningModule built from
    ``(model=, dm=, target=)`` that serves its own training streams and says how many ``iterations`` it runs."""
    extra = {}
    if cfg.adapt.get("feature_distance", 0) > 0:  # HRDA's FD: the ImageNet-initialised network as reference
        extra["reference"] = build_model(cfg, dm.num_classes).eval()
    module = instantiate_plugin(cfg.adapt, "adapt", model=model, dm=dm, target=target, **extra)
    method = cfg.adapt._target_.rsplit(".", 1)[-1].removesuffix("Module").lower()
    run.prepare(cfg)
    task = build_task(cfg)
    source_only = domain_accuracy(model, dm, target, task)
    trainer = build_trainer(cfg, run, "adapt", tags=["adapt", method, target], max_steps=module.iterations,
                            max_epochs=module.epochs, limit_val_batches=0, num_sanity_val_steps=0,
                            checkpoint=step_checkpoint(run.checkpoint_dir, cfg.adapt.get("checkpoint_every", 50)))
    trainer.fit(module, ckpt_path=resume_path(run, f"adapt/{target}"))
    adapted = domain_accuracy(model, dm, target, task)
    save_weights(model.state_dict(), run.weights_path, model_metadata(
        "fp", architecture(cfg.model, dm.num_classes), stage="adapt", domain=target))
    notice.info("adapt %s -> %s: source-only %.2f, adapted %.2f (%s)", dm.source, target, source_only, adapted,
                task.metric_name)
    return run.finish({"stage": "adapt", "method": method, "source": dm.source, "target": target,
                       "metric": task.metric_name, "source_only_acc": source_only, "adapted_acc": adapted})
