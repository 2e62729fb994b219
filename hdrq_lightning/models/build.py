"""Networks from config nodes: ``conf/model/*.yaml`` holds a ``_target_`` (a builder) and its arguments.

``architecture(cfg.model, num_classes)`` is what rebuilds the network with random weights, in another process (the
compile-ahead worker) or from a model file's metadata (models/io.py): the node without the keys that only choose
the initial weights of a new model (``INITIAL_WEIGHT_KEYS``), which a rebuild for loading must not need.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hdrq_lightning.errors import ConfigError, HdrqError
from hdrq_lightning.models.attention import unfuse_multihead_attention

INITIAL_WEIGHT_KEYS = ("pretrained", "checkpoint_path")


def model_config(node: DictConfig | Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """The model node as a plain dict with ``num_classes`` set (a ``_target_`` is required)."""
    config = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if not config.get("_target_"):
        raise ConfigError("the model config needs a _target_ naming its builder, e.g. "
                          "_target_: hdrq_lightning.models.shot.build_shot_net (see conf/model/).")
    return {**config, "num_classes": num_classes}


def architecture(node: DictConfig | Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """The model config that rebuilds the network with random weights (no initial-weight keys)."""
    return {k: v for k, v in model_config(node, num_classes).items() if k not in INITIAL_WEIGHT_KEYS}


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Instantiate a model config (``model_config`` or ``architecture``); our own errors come out unwrapped."""
    try:
        # nn.MultiheadAttention's fused projections as four Linear modules its forward calls (models/attention.py):
        # the quantizers and the post-merge solver see every projection, under the same names in every stage
        return unfuse_multihead_attention(hydra.utils.instantiate(dict(config), _convert_="all"))
    except InstantiationException as err:
        if isinstance(err.__cause__, HdrqError):
            raise err.__cause__ from None
        raise ConfigError(f"the model config {dict(config)} does not build: {err}") from None
