"""Stage `evaluate`: accuracy of any stage's model on every target domain, and their harmonic mean."""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.evaluation import evaluate_domains
from hdrq_lightning.models.io import model_file
from hdrq_lightning.report import wandb_run
from hdrq_lightning.stages.common import (
    build_datamodule,
    build_task,
    load_model,
    notice,
    stage_run,
    start_fresh_if_forced,
)
from hdrq_lightning.stages.settings import recorded_config, stage_settings

# Stages whose run dirs hold a model that `evaluate` can score.
MODEL_STAGES = ("source", "adapt", "quantize", "merge", "pmq")


def run_reference(cfg: DictConfig, value: str) -> tuple[str, ...]:
    """``evaluate.run`` as (stage, key...) of a finished model run inside ``<runs_dir>/<experiment>``.

    Relative values are taken under that folder, absolute ones must resolve inside it. Anything else (``..``, the
    experiment folder itself, another experiment, a path outside the runs) is refused: the evaluation's own output
    dir is derived from it, and ``force=true`` clears that dir.
    """
    root = Path(cfg.paths.runs_dir, cfg.name)
    given = Path(str(value))
    resolved = (given if given.is_absolute() else root / given).resolve()
    example = "e.g. evaluate.run=merge/hdrq_w4a4 or evaluate.run=adapt/<target>"
    if root.resolve() not in resolved.parents:
        raise ConfigError(f"evaluate.run={value!r} resolves to {resolved}, which is not a run dir inside {root}; "
                          f"give a run of this experiment as <stage>/<key...> ({example}).")
    parts = resolved.relative_to(root.resolve()).parts
    if parts[0] not in MODEL_STAGES or len(parts) < 2:
        raise ConfigError(f"evaluate.run={value!r} is not a model run: give <stage>/<key...> with the stage one of "
                          f"{', '.join(MODEL_STAGES)} ({example}).")
    return parts


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_evaluate(cfg: DictConfig) -> dict:
    if not cfg.evaluate.run:
        raise ConfigError("hdrq evaluate needs evaluate.run=<stage>/<key...>, a run dir under "
                          f"{Path(cfg.paths.runs_dir) / cfg.name} (e.g. evaluate.run=merge/hdrq_w4a4).")
    return evaluate_run(cfg, *run_reference(cfg, cfg.evaluate.run))


def evaluate_run(cfg: DictConfig, *parts: str) -> dict:
    dm = build_datamodule(cfg)
    source = stage_run(cfg, *parts)
    run = stage_run(cfg, "evaluate", *parts)
    weights = model_file(source.dir)
    digest = file_digest(weights)
    if run.is_done() and not cfg.force and run.metrics().get("model_sha256") != digest:
        # derived data of a model file that has been replaced since (its stage re-run with force=true): stale
        notice.info("re-evaluating %s: %s changed since it was evaluated", "/".join(parts), weights)
        run.clear()
    if not start_fresh_if_forced(cfg, run):
        return run.metrics()
    model = load_model(cfg, dm.num_classes, weights, train=False)
    run.prepare(cfg)
    result = evaluate_domains(model, dm, list(dm.targets), task=build_task(cfg))
    notice.info("evaluate %s: %s, harmonic mean %.2f%%", "/".join(parts), result["per_domain"], result["hmean"])
    recorded = recorded_config(source)  # what the evaluated model was made with, not this command's other groups
    wandb = wandb_run(cfg, run.dir, "evaluate", "evaluate/" + "/".join(parts), ["evaluate", *parts],
                      config={"run": "/".join(parts),
                              **(stage_settings(recorded, source.stage) if recorded is not None else {})})
    if wandb is not None:
        wandb.log({"evaluate/test/hmean": result["hmean"],
                   **{f"evaluate/test/acc_{d}": a for d, a in result["per_domain"].items()}})
        wandb.finish()
    return run.finish({"stage": "evaluate", "model": str(weights), "model_sha256": digest, **result})
