"""`hdrq <stage> [hydra overrides]`: the single entry point of every stage."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import textwrap
import warnings
from pathlib import Path

from omegaconf import DictConfig

from hdrq_lightning.errors import HdrqError

# stage -> (module, function, one-line description)
STAGES: dict[str, tuple[str, str, str]] = {
    "source": ("hdrq_lightning.stages.source", "run_source", "train the source model on the source domain"),
    "adapt": ("hdrq_lightning.stages.adapt", "run_adapt", "SHOT-adapt the source model to every target domain"),
    "quantize": ("hdrq_lightning.stages.quantize", "run_quantize",
                 "fold BN and quantize every expert by block reconstruction (quant=brecq|qdrop|hdrq)"),
    "merge": ("hdrq_lightning.stages.merge", "run_merge",
              "merge the quantized experts of one method/bit width (merge=fp: the FP experts)"),
    "pmq": ("hdrq_lightning.stages.pmq", "run_pmq",
            "post-merge quantization: merge the FP experts, then RTN / GPTQ / E-PMQ once (pmq=rtn|gptq|epmq)"),
    "evaluate": ("hdrq_lightning.stages.evaluate", "run_evaluate",
                 "evaluate a run's model on every target domain (evaluate.run=<stage>/<key>)"),
    "analyze": ("hdrq_lightning.stages.analyze", "run_analyze",
                "error barrier, loss surface and noise-sample spread of one method/bit width"),
    "pipeline": ("hdrq_lightning.stages.pipeline", "run_pipeline",
                 "source, adapt, quantize/merge/evaluate per method and bit width, analysis, summary"),
}

USAGE = """usage: hdrq <stage> [key=value ...] [hydra flags]

Stages:
{stages}

Overrides are Hydra's (e.g. experiment=digits quant=hdrq quant.w_bits=4); Hydra's own flags work too:
  hdrq <stage> --cfg job      print the composed config and exit
  hdrq <stage> --help         Hydra's help for the config groups
  hdrq <stage> -m ...         multirun (sweeps)
Runs land in runs/<experiment>/<stage>/...; a finished stage is skipped unless force=true.
"""


def config_dir() -> Path:
    """conf/ of the checkout this package runs from (or $HDRQ_CONFIG_DIR)."""
    path = Path(os.environ.get("HDRQ_CONFIG_DIR", Path(__file__).resolve().parent.parent / "conf"))
    if not (path / "config.yaml").is_file():
        print(f"hdrq: no config.yaml in {path}; install the package editable from its checkout (pip install -e .) "
              "or set HDRQ_CONFIG_DIR to the repository's conf/ folder.", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    return path


def run_stage(cfg: DictConfig):
    from hdrq_lightning.gpus import place_job

    place_job(cfg)  # parallel sweeps on one machine: one GPU per worker process
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    module, function, _ = STAGES[cfg.stage]
    return getattr(importlib.import_module(module), function)(cfg)


def route_library_logs() -> None:
    """Send Lightning's log records (GPU/TPU availability, tips, "fit stopped") through the root logger, i.e. to the
    run's log file, instead of Lightning's own terminal handler; warnings still reach the terminal."""
    import lightning.pytorch  # noqa: F401 - imported first: importing it adds the terminal handlers
    import torchmetrics  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "torchmetrics"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)
    # known third-party noise, once per Trainer: Lightning on this torch's pytree API, and the engine's deliberate
    # eval-mode modules (the FP model and the quantized model outside the current unit stay in eval mode)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"The '\w+_dataloader' does not have many workers")


# Exit codes: 2 for a usage or configuration error (ours, or Hydra's when it cannot compose the config), 1 for a
# crash (a traceback), 0 for success.
USAGE_ERROR = 2
_task_started = False


def _task(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    route_library_logs()
    try:
        run_stage(cfg)
    except HdrqError as err:
        message = textwrap.fill(f"hdrq {cfg.stage}: {err}", width=100)
        print(f"\nerror: {message}\n", file=sys.stderr)
        sys.exit(USAGE_ERROR)


# Hydra flags that take a value (argparse wants every flag before the overrides, which are one positional list)
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--info", "-i", "--experimental-rerun"}


def split_hydra_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, overrides): ``hdrq quantize quant=qdrop -m --cfg job`` works in any order."""
    flags, overrides, index = [], [], 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("-") and "=" not in arg:
            flags.append(arg)
            following = args[index + 1] if index + 1 < len(args) else None
            if arg in _VALUE_FLAGS and following is not None and "=" not in following and \
                    not following.startswith("-"):
                flags.append(following)
                index += 1
        else:
            overrides.append(arg)
        index += 1
    return flags, overrides


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = "\n".join(f"  {name:<10} {desc}" for name, (_, _, desc) in STAGES.items())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(stages=stages))
        return
    stage, overrides = argv[0], argv[1:]
    named = [arg.partition("=")[2] for arg in argv if arg.startswith("stage=")]
    if stage not in STAGES and named and named[-1] in STAGES:
        # a re-launch with the stage among the overrides: the DDP processes that Lightning starts for ranks > 0
        stage, overrides = named[-1], [arg for arg in argv if not arg.startswith("stage=")]
    if stage not in STAGES:
        print(f"hdrq: unknown stage '{stage}'.\n\n" + USAGE.format(stages=stages), file=sys.stderr)
        sys.exit(USAGE_ERROR)
    import hydra

    logging.getLogger("hdrq").setLevel(logging.INFO)
    flags, overrides = split_hydra_flags(overrides)
    # argv[0] stays the program that was run: Lightning's DDP launcher starts the other ranks with
    # `python <argv[0]> <argv[1:]>` (or `python -m <module> <argv[1:]>`), which must come back here
    sys.argv = [sys.argv[0], *flags, *overrides, f"stage={stage}"]
    try:
        hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(_task)()
    except SystemExit as exit_:
        # Hydra exits 1 when it cannot parse an override or compose the config (an unknown group option, a typo'd
        # key): that is a usage error, like ours; a failure once the stage ran keeps its own code
        if exit_.code == 1 and not _task_started:
            sys.exit(USAGE_ERROR)
        raise


if __name__ == "__main__":
    main()
