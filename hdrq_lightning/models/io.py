"""Model files: what a stage writes as its model, and rebuilding a network from such a file alone.

A model file is safetensors (opening one never runs code) whose metadata says what it holds:
``format`` (``fp``: a float state dict; ``fp_folded``: BN folded into the convolutions; ``quantized``: the integer
format of quant/export.py), ``model_config`` (the architecture: ``models/build.py::architecture``) and, for
``quantized``, ``quant_config`` (the numerics). ``load_model_file(path)`` rebuilds the network from those, not from
the current config, and runs no range search (the file holds the ranges). Files written before ``model_config``
was recorded need the architecture passed as ``fallback_architecture``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from hdrq_lightning.artifacts import MODEL_FILES, load_weights, save_weights, unreadable_weights
from hdrq_lightning.errors import ArtifactError
from hdrq_lightning.models.build import build_model
from hdrq_lightning.quant.export import load_integer_file, load_integer_state, save_integer_state
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import QuantConfig, quantize_model

FORMATS = ("fp", "fp_folded", "quantized")


def model_file(run_dir: Path) -> Path:
    """The model file of a run dir (the first of MODEL_FILES that exists)."""
    for name in MODEL_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise ArtifactError(f"no model file ({', '.join(MODEL_FILES)}) in {run_dir}; run the stage that writes it "
                        "first, or point to a finished run dir.")


def model_metadata(kind: str, architecture: Mapping[str, Any], numerics: QuantConfig | None = None,
                   **extra: str) -> dict[str, str]:
    """The metadata of a model file: its format, architecture and (quantized) numerics, plus ``extra``."""
    if kind not in FORMATS:
        raise ValueError(f"unknown model file format {kind!r}; one of {FORMATS}")
    metadata = {"format": kind, "model_config": json.dumps(dict(architecture), sort_keys=True), **extra}
    if numerics is not None:
        metadata["quant_config"] = json.dumps(asdict(numerics))
    return metadata


def save_model_file(state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> Path:
    """Write a model file atomically: integer states through quant/export.py, float ones as they are."""
    if metadata.get("format") == "quantized":
        save_integer_state(dict(state), path, metadata=dict(metadata))
        return Path(path)
    return save_weights(state, path, metadata)


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: one problem for the user
        raise unreadable_weights(path, error) from None


def file_architecture(path: Path, fallback: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The architecture recorded in a model file (or ``fallback`` for a file that records none)."""
    recorded = read_metadata(path).get("model_config")
    if recorded is not None:
        return json.loads(recorded)
    if fallback is None:
        raise ArtifactError(f"{path} does not record its model config (written by an older version); rebuild it "
                            "with the current one, or re-run the stage that wrote it with force=true.")
    return dict(fallback)


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise ArtifactError(f"{path} does not hold weights of the configured model ({detail}); it was made with "
                            "another model config: use the model settings it was made with, or re-run the stage "
                            f"that wrote {path.parent} with force=true.") from None
    return model


def integer_model(model: nn.Module, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> nn.Module:
    """The float ``model`` (of the file's architecture) folded, quantized with the file's numerics and loaded with
    the integer ``state`` (no range search: the ranges come from the state), in eval mode."""
    numerics = QuantConfig(**json.loads(metadata["quant_config"]))
    quantized = quantize_model(fold_batch_norm(model), numerics, init_ranges=False)
    return load_integer_state(quantized, dict(state)).eval()


def load_model_file(path: Path, fallback_architecture: Mapping[str, Any] | None = None) -> nn.Module:
    """The network a model file describes (float, BN-folded float or integer-quantized), in eval mode."""
    path = Path(path)
    metadata = read_metadata(path)
    model = build_model(file_architecture(path, fallback_architecture))
    kind = metadata.get("format", "fp")
    if kind == "quantized":
        state, _ = load_integer_file(path)
        return integer_model(model, state, metadata)
    if kind == "fp_folded":
        model = fold_batch_norm(model)
    return load_state_into(model, load_weights(path), path).eval()
