"""What every stage shares: run dirs, builders for data/model/trainer/loggers, fingerprints."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import nn

from hdrq_lightning.artifacts import (
    AtomicCheckpointIO,
    StageRun,
    fingerprint,
    load_weights,
    unreadable_weights,
)
from hdrq_lightning.callbacks.progress import StageProgress
from hdrq_lightning.errors import ArtifactError, ConfigError, HdrqError
from hdrq_lightning.models.shot import ShotNet, build_shot_net
from hdrq_lightning.quant.export import load_integer_file, load_integer_state
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import QuantConfig, quantize_model
from hdrq_lightning.stages.settings import DATA_IDENTITY_KEYS, mismatch_message, settings_mismatch

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


def fingerprints(cfg: DictConfig) -> dict[str, str]:
    data = {k: cfg.data.get(k) for k in DATA_IDENTITY_KEYS}
    return {"data": fingerprint(data), "model": fingerprint(cfg.model)}


def build_datamodule(cfg: DictConfig):
    try:
        return hydra.utils.instantiate(cfg.data, _convert_="all")
    except InstantiationException as err:  # surface our own one-paragraph errors, not Hydra's wrapper
        if isinstance(err.__cause__, HdrqError):
            raise err.__cause__ from None
        raise


def model_spec(cfg: DictConfig, num_classes: int) -> tuple[str, dict[str, Any]]:
    """("module:function", kwargs) that builds the experiment's network with random weights: importable in another
    process (the compile-ahead worker rebuilds the model from it and loads the weights it is sent)."""
    m = cfg.model
    return "hdrq_lightning.models.shot:build_shot_net", {"backbone": m.backbone, "num_classes": num_classes,
                                                          "bottleneck_dim": m.bottleneck_dim}


def build_model(cfg: DictConfig, num_classes: int) -> ShotNet:
    _, kwargs = model_spec(cfg, num_classes)
    return build_shot_net(**kwargs, pretrained=cfg.model.pretrained, checkpoint_path=cfg.model.checkpoint_path)


def _load_state(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise ArtifactError(f"{path} does not hold weights of the configured model ({detail}); it was made with "
                            "another model config: use the model settings it was made with, or re-run the stage "
                            f"that wrote {path.parent} with force=true.") from None


def load_model(cfg: DictConfig, num_classes: int, weights: Path) -> ShotNet:
    model = build_model(cfg, num_classes)
    _load_state(model, load_weights(weights), Path(weights))
    return model


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
_STAGE_COMMANDS = {"source": "source", "adapt": "adapt", "quantize": "quantize", "merge": "merge",
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


# ----------------------------------------------------------------------------------------------- model files
# The files a stage leaves, in the order a run dir is searched for "its model".
MODEL_FILES = ("merged.safetensors", "quantized.safetensors", "model.safetensors")


def model_file(run_dir: Path) -> Path:
    for name in MODEL_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise ArtifactError(f"no model file ({', '.join(MODEL_FILES)}) in {run_dir}; run the stage that writes it "
                        "first, or point to a finished run dir.")


def quantized_metadata(config: QuantConfig, **extra: str) -> dict[str, str]:
    return {"format": "quantized", "quant_config": json.dumps(asdict(config)), **extra}


def load_model_file(cfg: DictConfig, num_classes: int, path: Path) -> nn.Module:
    """Rebuild the network a weight file describes (FP, BN-folded FP, or integer-quantized), in eval mode."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: one problem for the user
        raise unreadable_weights(path, error) from None
    kind = metadata.get("format", "fp")
    if kind == "quantized":
        state, _ = load_integer_file(path)
        config = QuantConfig(**{**json.loads(metadata["quant_config"]), "init_search": "minmax"})
        model = quantize_model(fold_batch_norm(build_model(cfg, num_classes)), config)
        return load_integer_state(model, state).eval()
    model = build_model(cfg, num_classes)
    if kind == "fp_folded":
        model = fold_batch_norm(model)
    _load_state(model, load_weights(path), path)
    return model.eval()
