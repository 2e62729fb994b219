"""hdrq-lightning: merge-friendly post-training quantization on PyTorch Lightning."""

import os as _os

# No network on most research clusters' compute nodes: W&B runs land on disk unless told otherwise.
_os.environ.setdefault("WANDB_MODE", "offline")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
