"""What every stage shares: run dirs, the reuse check, builders for data/model/task/trainer/loggers."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hdrq_lightning.artifacts import AtomicCheckpointIO, StageRun
from hdrq_lightning.callbacks.progress import StageProgress
from hdrq_lightning.errors import ArtifactError, ConfigError, HdrqError
from hdrq_lightning.models.build import architecture, model_config
from hdrq_lightning.models.build import build_model as build_from_config
from hdrq_lightning.models.io import load_model_file
from hdrq_lightning.stages.settings import mismatch_message, settings_mismatch

log = logging.getLogger("hdrq")
# What a user sees on the terminal besides warnings and the progress lines: resumes, skips and results (the CLI's
# logging config prints this logger's INFO records; every other INFO record goes to the log file only).
notice = logging.getLogger("hdrq.notice")


def stage_run(cfg: DictConfig, stage: str, *keys: str) -> StageRun:
    """``<runs_dir>/<experiment>/<stage>/<keys...>``: stable, so a re-run or a requeued job finds its work."""
    for key in keys:
        key = str(key)
        if not key or key in (".", "..") or "/" in key or "\\" in key or Path(key).is_absolute():
            raise ConfigError(f"{key!r} is not a valid run name for stage {stage!r}: a run dir is "
                              f"{Path(cfg.paths.runs_dir) / cfg.name / stage}/<name>, with no '/' or '..' in it.")
    root = Path(cfg.paths.runs_dir, cfg.name, stage)
    return StageRun(root.joinpath(*map(str, keys)), root=root)


def _instantiate(config: Any) -> Any:
    """``hydra.utils.instantiate`` with our own one-paragraph errors surfaced instead of Hydra's wrapper."""
    try:
        return hydra.utils.instantiate(config, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, HdrqError):
            raise err.__cause__ from None
        raise


def build_datamodule(cfg: DictConfig):
    """The experiment's data module; one that declares ``stages`` (the stages it can serve) refuses the others."""
    dm = _instantiate(cfg.data)
    served, stage = getattr(dm, "stages", None), cfg.get("stage")
    if served is not None and stage not in (None, "???") and stage not in served:
        why = getattr(dm, "stages_note", "")
        raise ConfigError(f"data={cfg.data.get('name', 'this data')} serves only the {', '.join(served)} stages"
                          f"{f' ({why})' if why else ''}, not `hdrq {stage}`; run e.g. `hdrq {served[0]}` "
                          "with the same experiment.")
    return dm


# keys of a training plug-in's node that the stage reads (how often to checkpoint), not the module
STAGE_LEVEL_KEYS = ("checkpoint_every",)


def instantiate_plugin(node: DictConfig, group: str, **arguments: Any):
    """A training plug-in of ``group`` (``_target_`` + ``_partial_``) called with the stage's ``arguments``. Settings
    the plug-in does not take are one paragraph naming the group; errors raised while it builds are not hidden."""
    settings = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in STAGE_LEVEL_KEYS}
    target = node.get("_target_")
    try:
        factory = _instantiate(settings)
        inspect.signature(factory).bind(**arguments)
    except (InstantiationException, TypeError, ValueError) as err:
        raise ConfigError(f"{group}: {target} does not take these settings ({err}); check conf/{group}/ against "
                          "its parameters.") from None
    return factory(**arguments)


def build_task(cfg: DictConfig):
    """The experiment's task object (``cfg.task``: metric, loss, inference; tasks/)."""
    return hydra.utils.instantiate(cfg.task)


def build_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    """The experiment's network (``cfg.model``, a model plug-in), with its initial weights (random, or a local
    weight file)."""
    return build_from_config(model_config(cfg.model, num_classes))


def load_model(cfg: DictConfig, num_classes: int, weights: Path, train: bool = True) -> nn.Module:
    """A model file of an earlier stage (models/io.py), rebuilt from the architecture it records, in training mode
    as a freshly built model is (Lightning keeps the modes it finds: adaptation must see BatchNorm in training
    mode), or in eval mode (``train=False``) for inference."""
    return load_model_file(Path(weights), fallback_architecture=architecture(cfg.model, num_classes)).train(train)


def start_fresh_if_forced(cfg: DictConfig, run: StageRun) -> bool:
    """True if the stage must (re)run, False if ``run`` is done with this config's settings.

    With force=true the run dir is cleared first (by rank 0 only: under DDP the other ranks start later, when rank
    0 has cleared it and written the new run's first files); only a dir inside the stage's own folder is ever
    cleared. A finished run, or one that would resume from its checkpoint, whose recorded settings differ from
    this config's is refused with the differing keys named: it is never silently reused.
    """
    if cfg.force and run.dir.exists() and rank_zero_only.rank == 0:
        notice.info("force=true: clearing %s", run.dir)
        run.clear()
    done = run.is_done()
    if done or run.last_checkpoint is not None:
        differences = settings_mismatch(run, cfg, run.stage)
        if differences:
            raise ArtifactError(mismatch_message(
                run, differences, "Re-run it with the current settings by adding force=true (this replaces that "
                "run), or repeat the settings it was made with."))
    if done:
        notice.info("skipping %s: already done (force=true re-runs it)", run.dir)
        return False
    return True


def require_finished(upstream: StageRun, cfg: DictConfig, what: str) -> dict[str, Any]:
    """The metrics of a finished upstream run made with this config's settings for that stage (else an error)."""
    if not upstream.is_done():
        raise ArtifactError(
            f"{what} needs the finished run in {upstream.dir}, which is missing or incomplete; run `hdrq "
            f"{_STAGE_COMMANDS.get(upstream.stage, upstream.stage)}` first with the same experiment settings.")
    differences = settings_mismatch(upstream, cfg, upstream.stage)
    if differences:
        raise ArtifactError(mismatch_message(
            upstream, differences, f"{what} would use it as if it were made with the current ones. Re-run `hdrq "
            f"{_STAGE_COMMANDS.get(upstream.stage, upstream.stage)}` with the current settings and force=true, or "
            "repeat the settings it was made with."))
    return upstream.metrics()


# run-dir stage -> the command that makes it
_STAGE_COMMANDS = {"source": "source", "adapt": "adapt", "quantize": "quantize", "merge": "merge", "pmq": "pmq",
                   "analysis": "analyze", "evaluate": "evaluate"}


def build_loggers(cfg: DictConfig, run: StageRun, job_type: str, tags: Sequence[str] = ()) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(run.dir), name="logs", version="")]
    if cfg.logger.get("wandb"):
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError as err:  # pragma: no cover - wandb is a dependency
            raise ConfigError("logger=wandb needs the wandb package: pip install wandb.") from err
        loggers.append(WandbLogger(
            project=cfg.logger.project, entity=cfg.logger.get("entity"), group=cfg.name, job_type=job_type,
            tags=list(tags), name=f"{job_type}/{run.dir.relative_to(run.root) if run.root else run.dir.name}",
            id=run.wandb_id(), resume="allow",
            save_dir=str(run.dir), offline=cfg.logger.mode != "online",
            config=OmegaConf.to_container(cfg, resolve=True)))
    return loggers


def epoch_checkpoint(dirpath: Path | str) -> ModelCheckpoint:
    """``last.ckpt`` rewritten at the end of every epoch (every ``checkpoint_every`` engine iterations).

    Not ``save_top_k=0, save_last=True``: with nothing in the top k, Lightning writes ``last.ckpt`` only when
    training ends, so a killed run would have nothing to resume from.
    """
    return ModelCheckpoint(dirpath=dirpath, filename="last", save_top_k=1, save_last=False, every_n_epochs=1,
                           save_on_train_epoch_end=True, enable_version_counter=False)


def step_checkpoint(dirpath: Path | str, every: int) -> ModelCheckpoint:
    """``last.ckpt`` rewritten every ``every`` optimizer steps (training plug-ins that run a fixed number of
    steps in one pass over step-indexed batches resume from any of them)."""
    return ModelCheckpoint(dirpath=dirpath, filename="last", save_top_k=1, save_last=False, every_n_train_steps=every,
                           save_on_train_epoch_end=False, enable_version_counter=False)


class FinishWandbRun(Callback):
    """Close this stage's W&B run when its Trainer is done, so the next stage in the process opens its own."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if logger.__class__.__name__ == "WandbLogger" and trainer.is_global_zero:
                logger.experiment.finish()


def build_trainer(cfg: DictConfig, run: StageRun, job_type: str, tags: Sequence[str] = (),
                  checkpoint: ModelCheckpoint | None = None, callbacks: Sequence[Callback] = (),
                  progress: StageProgress | None = None, **overrides: Any) -> L.Trainer:
    """A Trainer writing checkpoints (atomically) into ``run.checkpoint_dir`` and logs into the run dir, with one
    progress line for the whole run (``progress``; default: optimizer steps and the epoch)."""
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(overrides)
    checkpoint = checkpoint or epoch_checkpoint(run.checkpoint_dir)
    all_callbacks: list[Callback] = [checkpoint, *callbacks]
    if cfg.logger.get("wandb"):
        all_callbacks.append(FinishWandbRun())
    if kwargs.get("enable_progress_bar", True):
        all_callbacks.append(progress or StageProgress(
            f"{job_type} {run.dir.relative_to(run.root) if run.root else run.dir.name}",
            total=lambda trainer, module: trainer.estimated_stepping_batches))
    return L.Trainer(default_root_dir=str(run.dir), logger=build_loggers(cfg, run, job_type, tags),
                     callbacks=all_callbacks, plugins=[AtomicCheckpointIO()], **kwargs)


def resume_path(run: StageRun, what: str) -> str | None:
    ckpt = run.last_checkpoint
    if ckpt is not None:
        notice.info("resuming %s from checkpoint %s", what, ckpt)
    return str(ckpt) if ckpt else None
