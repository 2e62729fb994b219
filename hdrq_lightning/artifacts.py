"""Stage run directories, atomic writes and safe weight files.

Every stage writes into a stable directory ``<runs_dir>/<experiment>/<stage>/<key...>/`` holding the resolved
config (``config.yaml``), Lightning checkpoints (``checkpoints/last.ckpt``), the final weights (safetensors) and
``metrics.json``. ``metrics.json`` is written last, so its presence with ``"status": "done"`` marks a finished
stage. Weights are safetensors, so opening somebody else's run dir never executes code.
"""

from __future__ import annotations

import json
import os
import shutil
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
# Model files: a float model (source, adapt), a quantized expert, a merged model (models/io.py reads them all).
WEIGHTS_FILE = "model.safetensors"
QUANTIZED_FILE = "quantized.safetensors"
MERGED_FILE = "merged.safetensors"
# the order in which a run dir is searched for "its model"
MODEL_FILES = (MERGED_FILE, QUANTIZED_FILE, WEIGHTS_FILE)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode any other write would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """``numpy.savez`` atomically (a reader never sees a partial cache file)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)


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


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the file's JSON header with its ``__metadata__`` keys in sorted order.

    safetensors serialises the metadata from a hash map, so two identical runs write the keys in different orders
    and the files differ byte for byte; sorted, equal runs give equal files (``sha256sum`` can compare runs). The
    tensor entries keep their order, the header its 8-byte alignment (padded with spaces, as safetensors does).
    """
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        if "__metadata__" not in header:
            return
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-(8 + len(text)) % 8)
        if len(text) == length:  # the usual case (same keys, other order): rewrite the header in place
            handle.seek(8)
            handle.write(text)
            return
        data = handle.read()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def save_weights(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict as safetensors, atomically (contiguous CPU copies, shared storage broken), with the
    metadata keys in sorted order so that identical runs write identical bytes."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        _sort_safetensors_metadata(tmp)
    return Path(path)


def unreadable_weights(path: Path, error: Exception) -> ArtifactError:
    return ArtifactError(
        f"{path} is not a readable safetensors file ({type(error).__name__}: {error}): it is truncated, corrupt or "
        f"of another format. Re-run the stage that wrote {path.parent} with force=true to write it again.")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f"weights file {path} does not exist; run the stage that writes {path.parent} first."
        )
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, decoding errors: one problem for the user
        raise unreadable_weights(path, error) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a half-written ``.ckpt`` behind (tmp file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


@dataclass(frozen=True)
class StageRun:
    """One stage's run directory and the files in it.

    ``root`` is the folder of the stage's own runs (``<runs_dir>/<experiment>/<stage>``): ``clear`` deletes ``dir``
    only when it lies strictly inside it, so a path given by a user can never make a stage delete an input, a
    parent folder or anything outside its own outputs.
    """

    dir: Path
    root: Path | None = None

    @property
    def stage(self) -> str | None:
        return None if self.root is None else self.root.name

    def clear(self) -> None:
        """Delete the run dir (refused unless it lies strictly inside the stage's own ``root``)."""
        if self.root is None:
            raise ArtifactError(f"refusing to delete {self.dir}: it is not known to be a stage's own output dir.")
        root, target = self.root.resolve(), self.dir.resolve()
        if self.dir.is_symlink() or target == root or root not in target.parents:
            raise ArtifactError(f"refusing to delete {self.dir}: it resolves to {target}, which is not a run dir "
                                f"inside {root}.")
        shutil.rmtree(target)

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
        """Write ``metrics.json`` (last: it marks the run done), with what the CPU results depend on: float
        summation order, hence the last digits of trained weights and sometimes an accuracy, depends on the
        number of torch threads."""
        record = {"status": "done", **metrics,
                  "environment": {"torch": torch.__version__, "threads": torch.get_num_threads()}}
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
