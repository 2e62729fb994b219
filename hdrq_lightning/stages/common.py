"""What every stage shares: run dirs, builders for data/model/trainer/loggers, fingerprints."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf

from hdrq_lightning.artifacts import AtomicCheckpointIO, StageRun, fingerprint, load_weights
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.models.shot import ShotNet, build_shot_net

log = logging.getLogger("hdrq")

# Data keys that change what a model learns; batch sizes, workers and the data root do not.
_DATA_IDENTITY_KEYS = ("name", "source", "seed", "image_size", "resize_size", "val_fraction", "transductive")


def stage_run(cfg: DictConfig, stage: str, *keys: str) -> StageRun:
    return StageRun(Path(cfg.paths.runs_dir) / cfg.name / stage / Path(*keys) if keys else
                    Path(cfg.paths.runs_dir) / cfg.name / stage)


def fingerprints(cfg: DictConfig) -> dict[str, str]:
    data = {k: cfg.data.get(k) for k in _DATA_IDENTITY_KEYS}
    return {"data": fingerprint(data), "model": fingerprint(cfg.model)}


def build_datamodule(cfg: DictConfig):
    return hydra.utils.instantiate(cfg.data, _convert_="all")


def build_model(cfg: DictConfig, num_classes: int) -> ShotNet:
    m = cfg.model
    return build_shot_net(m.backbone, num_classes, m.bottleneck_dim, m.pretrained, m.checkpoint_path)


def load_model(cfg: DictConfig, num_classes: int, weights: Path) -> ShotNet:
    model = build_model(cfg, num_classes)
    model.load_state_dict(load_weights(weights))
    return model


def start_fresh_if_forced(cfg: DictConfig, run: StageRun) -> bool:
    """True if the stage must (re)run; with force=true its old run dir is cleared first."""
    if cfg.force and run.dir.exists():
        log.info("force=true: clearing %s", run.dir)
        shutil.rmtree(run.dir)
    if run.is_done():
        log.info("skipping %s: already done (force=true re-runs it)", run.dir)
        return False
    return True


def build_loggers(cfg: DictConfig, run: StageRun, job_type: str, tags: Sequence[str] = ()) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=str(run.dir), name="logs", version="")]
    if cfg.logger.get("wandb"):
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError as err:  # pragma: no cover - wandb is a dependency
            raise ConfigError("logger=wandb needs the wandb package: pip install wandb.") from err
        loggers.append(WandbLogger(
            project=cfg.logger.project, entity=cfg.logger.get("entity"), group=cfg.name, job_type=job_type,
            tags=list(tags), name=f"{job_type}/{run.dir.name}", id=run.wandb_id(), resume="allow",
            save_dir=str(run.dir), offline=cfg.logger.mode != "online",
            config=OmegaConf.to_container(cfg, resolve=True)))
    return loggers


def build_trainer(cfg: DictConfig, run: StageRun, job_type: str, tags: Sequence[str] = (),
                  checkpoint: ModelCheckpoint | None = None, callbacks: Sequence[Callback] = (),
                  **overrides: Any) -> L.Trainer:
    """A Trainer writing checkpoints (atomically) into ``run.checkpoint_dir`` and logs into the run dir."""
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(overrides)
    checkpoint = checkpoint or ModelCheckpoint(dirpath=run.checkpoint_dir, save_last=True, save_top_k=0,
                                               every_n_epochs=1, save_on_train_epoch_end=True)
    all_callbacks: list[Callback] = [checkpoint, *callbacks]
    if kwargs.get("enable_progress_bar", True):
        all_callbacks.append(RichProgressBar())
    return L.Trainer(default_root_dir=str(run.dir), logger=build_loggers(cfg, run, job_type, tags),
                     callbacks=all_callbacks, plugins=[AtomicCheckpointIO()], **kwargs)


def resume_path(run: StageRun, what: str) -> str | None:
    ckpt = run.last_checkpoint
    if ckpt is not None:
        log.info("resuming %s from checkpoint %s", what, ckpt)
    return str(ckpt) if ckpt else None
