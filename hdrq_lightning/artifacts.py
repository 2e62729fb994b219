"""Stage run directories, atomic writes and safe weight files.

Every stage writes into a stable directory ``<runs_dir>/<experiment>/<stage>/<key...>/`` holding the resolved
config (``config.yaml``), Lightning checkpoints (``checkpoints/last.ckpt``), the final weights (safetensors) and
``metrics.json``. ``metrics.json`` is written last, so its presence with ``"status": "done"`` marks a finished
stage. Weights are safetensors, so opening somebody else's run dir never executes code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from hdrq_lightning.errors import ArtifactError

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_weights(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict as safetensors, atomically (contiguous CPU copies, shared storage broken)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f"weights file {path} does not exist; run the stage that produces it first "
            "(or pass an explicit path to an existing .safetensors file)."
        )
    return load_file(str(path))


def fingerprint(node: Any) -> str:
    """A short stable hash of a config subtree (what a later stage must match to reuse an artifact)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    blob = json.dumps(node, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written ``.ckpt`` behind (tmp file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


@dataclass(frozen=True)
class StageRun:
    """One stage's run directory and the files in it."""

    dir: Path

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def weights_path(self) -> Path:
        return self.dir / WEIGHTS_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def last_checkpoint(self) -> Path | None:
        last = self.checkpoint_dir / "last.ckpt"
        return last if last.is_file() else None

    def is_done(self) -> bool:
        if not self.metrics_path.is_file():
            return False
        try:
            return read_json(self.metrics_path).get("status") == "done"
        except json.JSONDecodeError:
            return False

    def metrics(self) -> dict[str, Any]:
        if not self.metrics_path.is_file():
            raise ArtifactError(
                f"{self.metrics_path} is missing: the stage that writes {self.dir} has not finished; run it first."
            )
        return read_json(self.metrics_path)

    def prepare(self, config: DictConfig | None = None) -> StageRun:
        self.dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            write_text(self.config_path, OmegaConf.to_yaml(config, resolve=True))
        return self

    def finish(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        record = {"status": "done", **metrics}
        write_json(self.metrics_path, record)
        return record

    def wandb_id(self) -> str:
        """The W&B run id of this stage, created once and kept in the run dir so a resumed run continues it."""
        id_file = self.dir / "wandb_id.txt"
        if id_file.is_file():
            return id_file.read_text().strip()
        import secrets

        run_id = secrets.token_hex(4)
        write_text(id_file, run_id)
        return run_id


def require_compatible(upstream: StageRun, expected: Mapping[str, str], what: str) -> dict[str, Any]:
    """Load an upstream stage's metrics and check its config fingerprints match ``expected``."""
    if not upstream.is_done():
        raise ArtifactError(
            f"{what} needs the finished run in {upstream.dir}, which is missing or incomplete; "
            f"run that stage first with the same experiment settings (or point to it with an explicit path)."
        )
    record = upstream.metrics()
    found = record.get("fingerprints", {})
    for key, value in expected.items():
        if key in found and found[key] != value:
            raise ArtifactError(
                f"{what}: the run in {upstream.dir} was produced with a different '{key}' configuration "
                f"(fingerprint {found[key]} vs {value} now); re-run that stage with force=true, or use the "
                f"'{key}' settings it was made with."
            )
    return record
