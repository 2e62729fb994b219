"""What determines a stage's output: the settings a finished (or resumable) run must match to be reused.

A run dir records its resolved config (``config.yaml``). A stage reuses a finished run, or resumes one from its
checkpoint, only when the keys that determine the run's output are equal in that record and in the current
config; runtime options (how the engine runs, where the data lives, logging, the trainer) are not among them.
A mismatch is refused with the differing keys named, never silently reused: e.g. a 20-iteration quantize run is
not taken for a 150-iteration one, and W4A4 runs copied into a W3A3 slot are not merged as W3A3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hdrq_lightning.artifacts import StageRun
from hdrq_lightning.errors import ArtifactError

# Data keys that change what a model learns or is scored on; batch sizes, workers and the data root do not.
DATA_IDENTITY_KEYS = ("name", "source", "seed", "image_size", "resize_size", "val_fraction", "transductive",
                      "num_classes", "crop_size", "train_scale", "test_scale", "cat_max_ratio", "mean", "std")
# Keys inside the groups below that say how a stage runs, not what it computes (a resumed run may change them).
RUNTIME_KEYS = ("quant.runtime", "quant.checkpoint_every", "pmq.chunk", "source.checkpoint_every",
                "adapt.checkpoint_every", "adapt.activation_checkpointing")

_TRAINED = ("seed", "model", "source")
# stage dir -> (config groups or keys, whether the data's target list matters)
_STAGE_KEYS: dict[str, tuple[tuple[str, ...], bool]] = {
    "source": (_TRAINED, False),
    "adapt": ((*_TRAINED, "adapt"), False),
    "quantize": ((*_TRAINED, "adapt", "quant"), False),
    "merge": ((*_TRAINED, "adapt", "merge"), True),  # + quant for quantized experts
    "pmq": ((*_TRAINED, "adapt", "pmq"), True),
    "analysis": ((*_TRAINED, "adapt", "quant", "merge", "analysis"), True),
    "evaluate": (("model",), True),  # + the evaluated file's digest, recorded by the stage
}


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = node


def stage_settings(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """The settings that determine the output of ``stage`` (a run-dir stage name), as flat dotted keys."""
    groups, with_targets = _STAGE_KEYS[stage]
    if stage == "merge" and cfg.merge.get("experts") == "quantized":
        groups = (*groups, "quant")
    container = OmegaConf.to_container(cfg, resolve=True)
    picked: dict[str, Any] = {}
    for group in groups:
        if group in container:
            _flatten(container[group], group, picked)
    data = container.get("data", {})
    for key in (*DATA_IDENTITY_KEYS, *(("targets",) if with_targets else ())):
        picked[f"data.{key}"] = data.get(key)
    return {k: v for k, v in picked.items() if not any(k == r or k.startswith(r + ".") for r in RUNTIME_KEYS)}


def recorded_config(run: StageRun) -> DictConfig | None:
    """The resolved config a run dir was made with (None for a dir without one)."""
    if not run.config_path.is_file():
        return None
    try:
        recorded = OmegaConf.load(run.config_path)
    except Exception as err:  # noqa: BLE001 - any unreadable YAML is the same problem for the user
        raise ArtifactError(f"{run.config_path} cannot be read ({err}); re-run the stage that wrote {run.dir} "
                            "with force=true.") from None
    return recorded if isinstance(recorded, DictConfig) else None


def differing_settings(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: recorded -> current`` for every key whose value differs (a key missing on one side counts)."""
    missing = "<unset>"
    return [f"{key}: {recorded.get(key, missing)!r} -> {current.get(key, missing)!r}"
            for key in sorted(set(recorded) | set(current)) if recorded.get(key, missing) != current.get(key, missing)]


# Keys added to the config after runs were recorded without them, with the value those runs implicitly had.
LEGACY_DEFAULTS = {"model._target_": "hdrq_lightning.models.shot.build_shot_net", "quant.units": "layer",
                   "quant.distance_anchor": "source", "quant.overrides": [], "pmq.overrides": []}


def settings_mismatch(run: StageRun, cfg: DictConfig, stage: str) -> list[str]:
    """The differing settings between the run dir's recorded config and ``cfg`` ([] when equal or unrecorded)."""
    recorded = recorded_config(run)
    if recorded is None:
        return []
    before = stage_settings(recorded, stage)
    for key, value in LEGACY_DEFAULTS.items():
        if any(k.startswith(key.split(".")[0] + ".") for k in before):
            before.setdefault(key, value)
    return differing_settings(before, stage_settings(cfg, stage))


def mismatch_message(run: StageRun, differences: list[str], remedy: str) -> str:
    shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
    return f"{run.dir} was made with other settings ({shown}). {remedy}"
