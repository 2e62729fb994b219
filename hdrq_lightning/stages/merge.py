"""Stage `merge`: merge the experts of one method and bit width (or the FP experts) into one model."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from hdrq_lightning.artifacts import MERGED_FILE, QUANTIZED_FILE, save_weights
from hdrq_lightning.errors import ArtifactError, ConfigError
from hdrq_lightning.merge import MERGE_METHODS, get_merge_method
from hdrq_lightning.models.build import architecture
from hdrq_lightning.models.io import model_metadata
from hdrq_lightning.quant.export import load_integer_file, save_integer_state
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.recipe import Recipe
from hdrq_lightning.stages.common import (
    build_datamodule,
    load_model,
    notice,
    require_finished,
    stage_run,
    start_fresh_if_forced,
)


def merge_key(cfg: DictConfig) -> str:
    """Run-dir name of a merge: the quant tag for quantized experts, fp_<method> for FP experts."""
    if cfg.merge.experts == "quantized":
        return Recipe.from_config(cfg.quant).tag
    if cfg.merge.experts == "fp":
        return f"fp_{cfg.merge.method}"
    raise ConfigError(f"merge.experts={cfg.merge.experts!r} is unknown; use 'quantized' or 'fp'.")


def _check_experts_kind(cfg: DictConfig) -> None:
    """Refuse a plug-in given experts of the other kind (integer codes averaged as floats, or a float merge named
    'quantized' that finds no integer keys): both would quietly produce a wrong model."""
    method = MERGE_METHODS.get(cfg.merge.method)
    given = "integer" if cfg.merge.experts == "quantized" else "float"
    if method is not None and method.takes != given:
        fitting = sorted(name for name, cls in MERGE_METHODS.items() if cls.takes == given)
        other = "merge=fp" if method.takes == "float" else "merge=quantized"
        raise ConfigError(
            f"merge.method={cfg.merge.method!r} merges {method.takes} experts, but merge.experts="
            f"{cfg.merge.experts!r} gives {given} ones; use one of {fitting} for these experts, or {other} for "
            f"{cfg.merge.method!r}.")


def _check_quantized_expert(record: dict, recipe: Recipe, expert_dir) -> None:
    """The expert's own record must say it was made with this method and these bits (a copied or renamed run dir
    would otherwise be merged and reported under the wrong name)."""
    found = {key: record.get(key) for key in ("method", "w_bits", "a_bits")}
    wanted = {"method": recipe.method, "w_bits": recipe.w_bits, "a_bits": recipe.a_bits}
    if found != wanted:
        raise ArtifactError(
            f"{expert_dir} holds a {found['method']} W{found['w_bits']}A{found['a_bits']} expert, but this merge is "
            f"{recipe.method} W{recipe.w_bits}A{recipe.a_bits}; re-run `hdrq quantize` for {recipe.tag} "
            f"(force=true replaces that dir).")


def quantized_experts(cfg: DictConfig, targets) -> list[tuple[dict, dict]]:
    """(integer state, metadata) of each target's quantized expert of ``cfg.quant``'s method and bits, checked
    against the experts' own records."""
    recipe = Recipe.from_config(cfg.quant)
    expert_runs = [stage_run(cfg, "quantize", recipe.tag, target) for target in targets]
    for expert_run in expert_runs:
        _check_quantized_expert(require_finished(expert_run, cfg, "merge"), recipe, expert_run.dir)
    return [load_integer_file(r.dir / QUANTIZED_FILE) for r in expert_runs]


def quantized_merge(cfg: DictConfig, targets, method, experts: list[tuple[dict, dict]] | None = None
                    ) -> tuple[dict, dict]:
    """(merged integer state, its metadata) of the quantized experts with the merge plug-in ``method``."""
    loaded = experts if experts is not None else quantized_experts(cfg, targets)
    merged = method.merge([state for state, _ in loaded])
    return merged, {**loaded[0][1], "merge_method": cfg.merge.method, "target": "+".join(targets)}


def merge_method(cfg: DictConfig, **overrides):
    """The configured merge plug-in (``merge.method`` with ``merge.params``, ``overrides`` on top)."""
    params = OmegaConf.to_container(cfg.merge.params, resolve=True)
    return get_merge_method(cfg.merge.method, **{**params, **overrides})


def run_merge(cfg: DictConfig) -> dict:
    dm = build_datamodule(cfg)
    run = stage_run(cfg, "merge", merge_key(cfg))
    _check_experts_kind(cfg)
    params = OmegaConf.to_container(cfg.merge.params, resolve=True)
    method = get_merge_method(cfg.merge.method, **params)
    if not start_fresh_if_forced(cfg, run):
        return run.metrics()
    if cfg.merge.experts == "quantized":
        merged, metadata = quantized_merge(cfg, dm.targets, method)
        run.prepare(cfg)
        save_integer_state(merged, run.dir / MERGED_FILE, metadata=metadata)
    else:
        source_run = stage_run(cfg, "source", dm.source)
        require_finished(source_run, cfg, "merge")
        source = fold_batch_norm(load_model(cfg, dm.num_classes, source_run.weights_path)).state_dict()
        experts = []
        for target in dm.targets:
            expert_run = stage_run(cfg, "adapt", target)
            require_finished(expert_run, cfg, "merge")
            experts.append(fold_batch_norm(load_model(cfg, dm.num_classes, expert_run.weights_path)).state_dict())
        merged = method.merge(experts, base=source if method.needs_base else None)
        run.prepare(cfg)
        save_weights(merged, run.dir / MERGED_FILE, model_metadata(
            "fp_folded", architecture(cfg.model, dm.num_classes), merge_method=cfg.merge.method))
    notice.info("merge %s: %s of %d experts -> %s", run.dir.name, cfg.merge.method, len(dm.targets), run.dir)
    return run.finish({"stage": "merge", "experts": cfg.merge.experts, "method": cfg.merge.method,
                       "params": params, "targets": list(dm.targets)})
