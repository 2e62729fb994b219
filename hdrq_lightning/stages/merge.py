"""Stage `merge`: merge the experts of one method and bit width (or the FP experts) into one model."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from hdrq_lightning.artifacts import require_compatible, save_weights
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.merge import get_merge_method
from hdrq_lightning.quant.export import load_integer_file, save_integer_state
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.recipe import Recipe
from hdrq_lightning.stages.common import (
    build_datamodule,
    fingerprints,
    load_model,
    log,
    stage_run,
    start_fresh_if_forced,
)
from hdrq_lightning.stages.quantize import QUANTIZED_FILE

MERGED_FILE = "merged.safetensors"


def merge_key(cfg: DictConfig) -> str:
    """Run-dir name of a merge: the quant tag for quantized experts, fp_<method> for FP experts."""
    if cfg.merge.experts == "quantized":
        return Recipe.from_config(cfg.quant).tag
    if cfg.merge.experts == "fp":
        return f"fp_{cfg.merge.method}"
    raise ConfigError(f"merge.experts={cfg.merge.experts!r} is unknown; use 'quantized' or 'fp'.")


def run_merge(cfg: DictConfig) -> dict:
    dm = build_datamodule(cfg)
    run = stage_run(cfg, "merge", merge_key(cfg))
    if not start_fresh_if_forced(cfg, run):
        return run.metrics()
    params = OmegaConf.to_container(cfg.merge.params, resolve=True)
    method = get_merge_method(cfg.merge.method, **params)
    expected = fingerprints(cfg)
    run.prepare(cfg)
    if cfg.merge.experts == "quantized":
        recipe = Recipe.from_config(cfg.quant)
        expert_runs = [stage_run(cfg, "quantize", recipe.tag, target) for target in dm.targets]
        for expert_run in expert_runs:
            require_compatible(expert_run, expected, "merge")
        loaded = [load_integer_file(r.dir / QUANTIZED_FILE) for r in expert_runs]
        merged = method.merge([state for state, _ in loaded])
        metadata = {**loaded[0][1], "merge_method": cfg.merge.method, "target": "+".join(dm.targets)}
        save_integer_state(merged, run.dir / MERGED_FILE, metadata=metadata)
    else:
        source_run = stage_run(cfg, "source", dm.source)
        require_compatible(source_run, expected, "merge")
        source = fold_batch_norm(load_model(cfg, dm.num_classes, source_run.weights_path)).state_dict()
        experts = []
        for target in dm.targets:
            expert_run = stage_run(cfg, "adapt", target)
            require_compatible(expert_run, expected, "merge")
            experts.append(fold_batch_norm(load_model(cfg, dm.num_classes, expert_run.weights_path)).state_dict())
        merged = method.merge(experts, base=source)
        save_weights(merged, run.dir / MERGED_FILE, {"format": "fp_folded", "merge_method": cfg.merge.method})
    log.info("merge %s: %s of %d experts -> %s", run.dir.name, cfg.merge.method, len(dm.targets), run.dir)
    return run.finish({"stage": "merge", "experts": cfg.merge.experts, "method": cfg.merge.method,
                       "params": params, "targets": list(dm.targets), "fingerprints": expected})
