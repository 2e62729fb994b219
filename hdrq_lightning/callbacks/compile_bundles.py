"""Portable compile bundles (``quant.runtime.compile_bundles``): a new machine or a Docker image starts warm.

Inductor's on-disk caches (FX graphs, AOT-autograd graphs, Triton kernels, autotuning) live on one machine;
``torch.compiler.save_cache_artifacts`` packs what a process compiled or loaded from them into one blob, and
``torch.compiler.load_cache_artifacts`` writes such a blob into another machine's caches. With
``quant.runtime.compile_bundles=<folder>`` (and ``compile`` on) the quantize stage loads every bundle in the folder
before anything compiles (so the engine and the compile-ahead worker both find their graphs), and when training
ends adds its own: ``<folder>/<hash of the artifacts' keys>.bin``, written atomically; not when the loaded bundles
held every graph of the run (autotuning results aside) or a bundle with the same keys is there (every job of a sweep
over one configuration compiles the same graphs; other bit widths or models add their own file). Under DDP every
rank adds its own (their graphs differ in the batch slice and the device index).

A bundle hits only where the cache keys match: the same torch and Triton versions, the same GPU model and the
same graphs (architecture, quantizer settings, runtime, shapes). Best effort, like the compile-ahead worker: a
bundle that does not load is named in a warning and skipped, and a failed save only costs the warm start.
To bake a warm start into an image: run one job per configuration with the folder set, then copy the folder
into the image and point ``quant.runtime.compile_bundles`` at it there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("hdrq")

SUFFIX = ".bin"
# Artifact kinds that alone do not make a new bundle: an autotuning result is one kernel's launch choice, benchmarked
# again in well under a second, against a bundle of ~140 MB for a ResNet-50 (a GPU run that loaded every graph from
# a bundle still autotuned one kernel anew: bench/results/README.md)
CHEAP_KINDS = frozenset({"autotune"})


def load_bundles(folder: str | Path) -> tuple[int, set[str]]:
    """Write every bundle of ``folder`` into this machine's compile caches; returns how many loaded and the keys
    (``artifact_keys``) they held."""
    loaded, keys = 0, set()
    for path in sorted(Path(folder).glob(f"*{SUFFIX}")):
        try:  # a corrupt blob: torch logs it and returns None (some versions raise)
            info = torch.compiler.load_cache_artifacts(path.read_bytes())
            problem = None if info is not None else "unreadable: truncated, or from another torch version"
        except Exception as error:
            problem = f"{type(error).__name__}: {error}"
        if problem is not None:
            log.warning("compile bundle %s not loaded (%s); its graphs are compiled instead", path, problem)
            continue
        loaded += 1
        keys |= artifact_keys(info.artifacts)
    return loaded, keys


def artifact_keys(artifacts: dict[str, list[Any]]) -> set[str]:
    """``kind:key`` of every artifact of a bundle (``CacheInfo.artifacts``: kind -> keys)."""
    return {f"{kind}:{key}" for kind, entries in artifacts.items() for key in entries}


def bundle_name(artifacts: dict[str, list[Any]]) -> str:
    """The file name of a bundle: a hash of its artifacts' types and keys (not of its bytes, which need not
    repeat exactly), so that runs compiling the same graphs name the same file."""
    return hashlib.sha256("\n".join(sorted(artifact_keys(artifacts))).encode()).hexdigest()[:20] + SUFFIX


def save_bundle(folder: str | Path, known: set[str] = frozenset()) -> Path | None:
    """Add this process's compile artifacts to ``folder`` (see the module docstring); returns the bundle's path,
    or None when there was nothing new to save: no artifacts, or none but ``CHEAP_KINDS`` outside ``known`` (the
    keys of the bundles this process loaded: a run that compiled nothing adds no copy of what it loaded, whose keys
    need not hash to the same name)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, info = saved
    new = artifact_keys(info.artifacts) - known
    if all(key.split(":", 1)[0] in CHEAP_KINDS for key in new):
        log.info("compile bundles: every graph of this run came from the folder's bundles; none written%s",
                 f" ({len(new)} new autotuning results left out)" if new else "")
        return None
    folder = Path(folder)
    path = folder / bundle_name(info.artifacts)
    if path.exists():
        log.info("compile bundle %s already holds this run's graphs", path)
        return path
    folder.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    kinds = sorted({key.split(":", 1)[0] for key in new})
    log.info("compile bundle %s written (%.1f MB, %d artifacts not in the loaded bundles: %s): a machine that loads "
             "it starts warm", path, len(data) / 1e6, len(new), ", ".join(kinds))
    return path


class CompileBundlesCallback(Callback):
    """Loads the bundles of ``folder`` when the Trainer sets up (before the engine and the compile-ahead worker
    compile) and adds this run's when training ends; nothing without a folder or with ``compile`` off."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder in (None, "") else Path(folder).expanduser()
        self.loaded, self.known = 0, set()  # bundles loaded at the last setup, their artifacts' keys

    def _applies(self, pl_module: Any) -> bool:
        return self.folder is not None and pl_module.runtime.compile

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self.loaded, self.known = 0, set()
        if self.folder is not None and not self._applies(pl_module):
            log.info("compile bundles in %s not used: quant.runtime.compile is off", self.folder)
        elif self._applies(pl_module) and self.folder.is_dir():
            self.loaded, self.known = load_bundles(self.folder)
            log.info("compile bundles: %d loaded from %s", self.loaded, self.folder)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self._applies(pl_module):
            return
        try:
            save_bundle(self.folder, self.known)
        except Exception as error:  # a full disk, a read-only folder: the run itself is done
            log.warning("compile bundle not written to %s (%s: %s)", self.folder, type(error).__name__, error)
