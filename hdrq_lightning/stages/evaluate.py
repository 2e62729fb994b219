"""Stage `evaluate`: accuracy of any stage's model on every target domain, and their harmonic mean."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.evaluation import evaluate_domains
from hdrq_lightning.report import wandb_run
from hdrq_lightning.stages.common import (
    build_datamodule,
    fingerprints,
    load_model_file,
    log,
    model_file,
    stage_run,
    start_fresh_if_forced,
)


def run_evaluate(cfg: DictConfig) -> dict:
    if not cfg.evaluate.run:
        raise ConfigError("hdrq evaluate needs evaluate.run=<stage>/<key...>, a run dir under "
                          f"{Path(cfg.paths.runs_dir) / cfg.name} (e.g. evaluate.run=merge/hdrq_w4a4).")
    return evaluate_run(cfg, *Path(cfg.evaluate.run).parts)


def evaluate_run(cfg: DictConfig, *parts: str) -> dict:
    dm = build_datamodule(cfg)
    source = stage_run(cfg, *parts)
    run = stage_run(cfg, "evaluate", *parts)
    if not start_fresh_if_forced(cfg, run):
        return run.metrics()
    weights = model_file(source.dir)
    model = load_model_file(cfg, dm.num_classes, weights)
    run.prepare(cfg)
    result = evaluate_domains(model, dm, list(dm.targets))
    log.info("evaluate %s: %s, harmonic mean %.2f%%", "/".join(parts), result["per_domain"], result["hmean"])
    wandb = wandb_run(cfg, run.dir, "evaluate", "evaluate/" + "/".join(parts), ["evaluate", *parts])
    if wandb is not None:
        wandb.log({"evaluate/test/hmean": result["hmean"],
                   **{f"evaluate/test/acc_{d}": a for d, a in result["per_domain"].items()}})
        wandb.finish()
    return run.finish({"stage": "evaluate", "model": str(weights), "fingerprints": fingerprints(cfg), **result})
