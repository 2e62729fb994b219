"""What a benchmark result file records about where it came from, and its atomic write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def commit() -> str:
    """The short commit of the checkout, with ``+changes`` when the working tree differs from it (the device tool
    runs a copy of the working tree on a machine whose git HEAD may be an older commit: then the recorded commit
    is only where the copy started from)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return f"{head}+changes" if head and dirty else head or "unknown"


def gpu() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def compile_cache_state() -> str:
    """``cold`` when Inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR`` or torch's default) is empty or absent,
    else ``warm``: call it before anything compiles."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    folder = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir())
    return "warm" if folder.is_dir() and any(folder.iterdir()) else "cold"


def write_result(out: str | Path, name: str, record: dict) -> Path:
    """``record`` with the command, date, GPU, torch version and commit, as ``<out>/<name>`` (JSON)."""
    record = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "gpu": gpu(),
              "torch": torch.__version__, "commit": commit(), **record}
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)
    print(f"wrote {path}")
    return path
