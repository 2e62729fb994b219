"""Stage `pmq`: post-merge quantization. Merge the BN-folded FP experts, then quantize the merged model once
(RTN, GPTQ or E-PMQ: hdrq_lightning/pmq/), evaluate it on every target, and write it in the integer format.

Needs only the `source` and `adapt` runs. Resumable after every unit: the partly quantized model and the rows of
``layers.json`` so far are checkpointed atomically; a resumed run walks the calibration images through the
finished prefix again and continues (on the CPU the result equals an uninterrupted run bit for bit).
``pmq.select.grid`` first chooses the method's parameters without labels (``select_params``).
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from hdrq_lightning.artifacts import (
    MERGED_FILE,
    QUANTIZED_FILE,
    load_weights,
    read_json,
    save_weights,
    write_json,
)
from hdrq_lightning.errors import ArtifactError, ConfigError
from hdrq_lightning.evaluation import default_device, evaluate_domains, select_task
from hdrq_lightning.merge import get_merge_method
from hdrq_lightning.models.build import architecture, build_model
from hdrq_lightning.models.io import model_metadata, save_model_file
from hdrq_lightning.models.multitask import MultiTaskNet, models_from_files
from hdrq_lightning.pmq import PMQ_METHODS, PostMergeQuantizer, get_pmq_method
from hdrq_lightning.quant.export import export_integer_state
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import QuantConfig, calibrate_activations, quantize_model
from hdrq_lightning.quant.quantizers import check_bits
from hdrq_lightning.quant.recipe import plain_overrides
from hdrq_lightning.report import wandb_run
from hdrq_lightning.stages.common import (
    build_datamodule,
    build_task,
    load_model,
    notice,
    require_finished,
    stage_run,
    start_fresh_if_forced,
)
from hdrq_lightning.stages.evaluate import file_digest
from hdrq_lightning.stages.settings import mismatch_message, settings_mismatch

STATE_FILE = "pmq_state.safetensors"
ROWS_FILE = "layers_partial.json"
LAYERS_FILE = "layers.json"
DIGESTS_FILE = "inputs_sha256.json"


class Interrupted(Exception):
    """Raised after unit ``stop_after_unit`` (tests of the resume path)."""


def pmq_key(cfg: DictConfig) -> str:
    """``<merge>_<method>_w<W>[a<A>][_float][_<tag>]``."""
    p = cfg.pmq
    key = f"{p.merge.method}_{p.method}_w{p.w_bits}" + (f"a{p.a_bits}" if p.a_bits is not None else "")
    if not p.quantize:
        key += "_float"
    if p.get("tag"):
        key += f"_{p.tag}"
    return key


def numerics(cfg: DictConfig) -> QuantConfig:
    p = cfg.pmq
    check_bits(p.w_bits, "pmq.w_bits")
    if p.a_bits is not None:
        check_bits(p.a_bits, "pmq.a_bits")
    return QuantConfig(w_bits=p.w_bits, a_bits=p.a_bits, w_per_channel=p.per_channel, w_symmetric=p.symmetric,
                       first_last_8bit=p.first_last_8bit, init_search=p.grid,
                       overrides=tuple(plain_overrides(p.get("overrides"), "pmq.overrides")))


def _models(cfg: DictConfig, dm, targets: list[str]) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(base, experts in target order): the BN-folded source and adapt runs of the experiment, or the local files
    of ``pmq.models`` (the clip_* presets: a base encoder and one expert per task, heads per task; no BN)."""
    files = cfg.pmq.get("models") or {}
    if files.get("base"):
        network = build_model(architecture(cfg.model, dm.num_classes))
        if not isinstance(network, MultiTaskNet):
            raise ConfigError("pmq.models.base reads a base and experts from files into the multi-task network; "
                              "use model=vit_tasks with data=task_folders (see conf/experiment/clip_vit_b32.yaml), "
                              "or leave pmq.models.base null to use the experiment's source and adapt runs.")
        return models_from_files(network, files["base"], dict(files.get("experts") or {}), files.get("heads"))
    if files.get("experts"):
        raise ConfigError("pmq.models.experts is set but pmq.models.base is not; the merge starts from the base "
                          "model: give pmq.models.base=<file>.")
    source_run = stage_run(cfg, "source", dm.source)
    require_finished(source_run, cfg, "pmq")
    source = fold_batch_norm(load_model(cfg, dm.num_classes, source_run.weights_path, train=False))
    experts = []
    for target in targets:
        expert_run = stage_run(cfg, "adapt", target)
        require_finished(expert_run, cfg, "pmq")
        experts.append(fold_batch_norm(load_model(cfg, dm.num_classes, expert_run.weights_path, train=False)))
    return source, experts


def _file_digests(cfg: DictConfig) -> dict[str, str]:
    """sha256 of every ``pmq.models`` file (``{}`` when the models come from the experiment's runs, which the
    settings check covers): a run made from a file is reused only while the file's contents are the same."""
    files = cfg.pmq.get("models") or {}
    if not files.get("base"):
        return {}
    paths = {"base": files["base"], **{f"experts.{t}": f for t, f in (files.get("experts") or {}).items()},
             **({"heads": files["heads"]} if files.get("heads") else {})}
    return {key: file_digest(Path(path)) for key, path in paths.items() if Path(path).is_file()}


def _check_file_digests(run, digests: dict[str, str]) -> None:
    """Refuse a finished or resumable run made from other contents of the ``pmq.models`` files."""
    recorded = run.metrics().get("inputs_sha256") if run.is_done() else (
        read_json(run.checkpoint_dir / DIGESTS_FILE) if (run.checkpoint_dir / DIGESTS_FILE).is_file() else None)
    if recorded is None:
        return
    changed = sorted(k for k in set(recorded) | set(digests) if recorded.get(k) != digests.get(k))
    if changed:
        raise ArtifactError(f"{run.dir} was made from other contents of the pmq.models files "
                            f"({', '.join(changed)}): re-run it with force=true (this replaces that run), or "
                            "point pmq.models back at the files it was made from.")


def _merge(cfg: DictConfig):
    name = cfg.pmq.merge.method
    params = OmegaConf.to_container(cfg.pmq.merge.params, resolve=True).get(name, {}) or {}
    merger = get_merge_method(name, **params)
    if merger.takes != "float":
        raise ConfigError(f"pmq.merge.method={name!r} merges integer experts; post-merge quantization merges the FP "
                          "experts first: use mean, task_arithmetic or ties.")
    return merger, params


def _deployable(merged: torch.nn.Module, config: QuantConfig, quantize: bool) -> torch.nn.Module:
    """The model the solver writes into: the merged model with weight quantizers (no range yet), or a float copy
    for the relaxation."""
    return quantize_model(merged, config, init_ranges=False) if quantize else copy.deepcopy(merged)


def _solver(p: DictConfig, deployed, merged, experts, calibration, method, source, device) -> PostMergeQuantizer:
    blend = float(getattr(method.params, "anchor_blend", 1.0))
    return PostMergeQuantizer(deployed, merged, experts, calibration, method, quantize=p.quantize, grid=p.grid,
                              base=source if blend != 1.0 else None, anchor_blend=blend, device=device,
                              chunk=p.chunk)


@torch.no_grad()
def expert_divergence(model: torch.nn.Module, experts: list, held_out: list[torch.Tensor], targets: list[str],
                      device) -> float:
    """Mean over targets of KL(expert_t || model) of the class posteriors on target t's held-out images: how far
    the deployed model is from each expert on its own domain, without labels."""
    model = model.to(device).eval()
    total = 0.0
    for expert, images, target in zip(experts, held_out, targets):
        images = images.to(device)
        select_task(model, target)
        select_task(expert, target)
        reference = F.log_softmax(expert.to(device).eval()(images), 1)
        total += float(F.kl_div(F.log_softmax(model(images), 1), reference, log_target=True, reduction="batchmean"))
    return total / len(experts)


def _candidates(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(grid[k]) for k in keys))]


def select_params(cfg: DictConfig, run, merged, experts, calibration, targets, dm, config, source, device) -> dict:
    """Label-free choice of the method's parameters: every combination of ``pmq.select.grid`` is solved on the
    calibration images and scored by ``expert_divergence`` on ``pmq.select.holdout`` further train images per
    target (disjoint from the calibration set: the next images of the same seeded order); the lowest wins. The
    scores are kept in ``checkpoints/selection.json`` as they come, so a resumed run skips scored candidates.
    Each candidate's test accuracy is recorded beside its score for the reader, never used."""
    p = cfg.pmq
    base = OmegaConf.to_container(p.params, resolve=True) or {}
    size = p.calibration_size + p.select.holdout
    held_out = [torch.cat([x for x, _, _ in dm.calibration_loader(t, size=size)])[p.calibration_size:]
                for t in targets]
    if any(len(h) == 0 for h in held_out):
        raise ConfigError(f"pmq.select.holdout={p.select.holdout}: a target has no train image left after the "
                          f"{p.calibration_size} calibration images; lower pmq.calibration_size.")
    path = run.checkpoint_dir / "selection.json"
    scored = read_json(path) if path.is_file() else []
    task = build_task(cfg)
    for candidate in _candidates(OmegaConf.to_container(p.select.grid, resolve=True)):
        if any(entry["params"] == candidate for entry in scored):
            continue
        deployed = _deployable(merged, config, p.quantize)
        _solver(p, deployed, merged, experts, calibration, get_pmq_method(p.method, **{**base, **candidate}),
                source, device).run()
        result = evaluate_domains(deployed, dm, targets, task=task)
        scored.append({"params": candidate, "divergence": round(expert_divergence(deployed, experts, held_out,
                                                                                  targets, device), 6),
                       "test_mean_not_used": result["mean"], "test_hmean_not_used": result["hmean"]})
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, scored)
        notice.info("pmq %s: %s -> divergence %.4f", run.dir.name, candidate, scored[-1]["divergence"])
    best = min(scored, key=lambda entry: entry["divergence"])
    return {"chosen": best["params"], "holdout": p.select.holdout, "candidates": scored}


def run_pmq(cfg: DictConfig, stop_after_unit: int | None = None) -> dict:
    dm = build_datamodule(cfg)
    p = cfg.pmq
    if p.method not in PMQ_METHODS:
        raise ConfigError(f"pmq.method={p.method!r} is unknown; use one of {sorted(PMQ_METHODS)} (pmq=<preset>).")
    method = get_pmq_method(p.method, **(OmegaConf.to_container(p.params, resolve=True) or {}))
    merger, merge_params = _merge(cfg)
    config = numerics(cfg)
    if p.calibration_size < 1 or p.chunk < 1:
        raise ConfigError(f"pmq.calibration_size={p.calibration_size} and pmq.chunk={p.chunk} must be positive.")
    run = stage_run(cfg, "pmq", pmq_key(cfg))
    digests = _file_digests(cfg)
    if digests and not cfg.force:
        _check_file_digests(run, digests)
    if not start_fresh_if_forced(cfg, run):
        return run.metrics()
    state_path = run.checkpoint_dir / STATE_FILE
    if state_path.is_file() or (run.checkpoint_dir / "selection.json").is_file():  # a partial run: same settings?
        differences = settings_mismatch(run, cfg, "pmq")
        if differences:
            raise ArtifactError(mismatch_message(run, differences, "Re-run it with the current settings by adding "
                                                 "force=true (this replaces that run), or repeat its settings."))
    started = time.perf_counter()
    targets = list(dm.targets)
    source, experts = _models(cfg, dm, targets)
    merged = copy.deepcopy(source)
    merged.load_state_dict(merger.merge([e.state_dict() for e in experts],
                                        base=source.state_dict() if merger.needs_base else None))
    deployed = _deployable(merged, config, p.quantize)
    device = default_device()
    calibration = [torch.cat([images for images, _, _ in dm.calibration_loader(t, size=p.calibration_size)])
                   for t in targets]
    run.prepare(cfg)
    if digests:
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.checkpoint_dir / DIGESTS_FILE, digests)
    params = OmegaConf.to_container(p.params, resolve=True) or {}
    selection = None
    if p.select.grid:
        selection = select_params(cfg, run, merged, experts, calibration, targets, dm, config, source, device)
        params = {**params, **selection["chosen"]}
        method = get_pmq_method(p.method, **params)
    start, rows = 0, []
    if state_path.is_file():
        deployed.load_state_dict(load_weights(state_path))
        saved = read_json(run.checkpoint_dir / ROWS_FILE)
        start, rows = saved["next_unit"], saved["rows"]
        notice.info("resuming pmq/%s at unit %d", run.dir.name, start)
    solver = _solver(p, deployed, merged, experts, calibration, method, source, device)

    def checkpoint(k: int, unit_rows) -> None:
        rows.extend(r.record() for r in unit_rows)
        save_weights(deployed.state_dict(), state_path)
        write_json(run.checkpoint_dir / ROWS_FILE, {"next_unit": k + 1, "rows": rows})
        if stop_after_unit is not None and k == stop_after_unit:
            raise Interrupted(f"stopped after unit {k}")

    solver.run(start, checkpoint)
    if p.a_bits is not None and p.quantize:
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # the activation sample is random
        calibrate_activations(deployed, [x.to(device) for c in calibration for x in c.split(p.chunk)])
    task = build_task(cfg)
    fp = evaluate_domains(merged, dm, targets, task=task)
    result = evaluate_domains(deployed, dm, targets, task=task)
    arch = architecture(cfg.model, dm.num_classes)
    extra = {"pmq_method": p.method, "merge_method": p.merge.method, "target": "+".join(targets)}
    if p.quantize:
        save_model_file(export_integer_state(deployed.cpu()), run.dir / QUANTIZED_FILE,
                        model_metadata("quantized", arch, config, **extra))
    else:
        save_weights(deployed.cpu().state_dict(), run.dir / MERGED_FILE, model_metadata("fp_folded", arch, **extra))
    write_json(run.dir / LAYERS_FILE, rows)
    seconds = round(time.perf_counter() - started, 2)
    record = {"stage": "pmq", "method": p.method, "merge": p.merge.method, "merge_params": merge_params,
              "w_bits": p.w_bits, "a_bits": p.a_bits, "quantize": bool(p.quantize), "targets": targets,
              "per_domain": result["per_domain"], "mean": result["mean"], "hmean": result["hmean"],
              "fp_merge": fp, "params": params, **({"selection": selection} if selection else {}),
              "fallbacks": sum(1 for r in rows if r.get("fallback")), "seconds": seconds, "device": str(device),
              **({"inputs_sha256": digests} if digests else {})}
    _log_wandb(cfg, run.dir, record, rows)
    notice.info("pmq %s: mean %.2f%%, harmonic mean %.2f%% (FP merge %.2f%% / %.2f%%; %.1fs)", run.dir.name,
                result["mean"], result["hmean"], fp["mean"], fp["hmean"], seconds)
    return run.finish(record)


def _log_wandb(cfg: DictConfig, run_dir: Path, record: dict, rows: list[dict]) -> None:
    tags = [record["method"], record["merge"], f"w{record['w_bits']}"]
    wandb = wandb_run(cfg, run_dir, "pmq", f"pmq/{run_dir.name}", tags,
                      config={"pmq": OmegaConf.to_container(cfg.pmq, resolve=True)})
    if wandb is None:
        return
    import wandb as wandb_module

    table = wandb_module.Table(columns=["layer", "rows", "columns", "bits", "mu", "damp_used", "fallback",
                                        "gptq_loss", "expert_error"])
    for r in rows:
        table.add_data(r["layer"], r["rows"], r["columns"], r["bits"], r["mu"], r["damp_used"], r["fallback"],
                       r["gptq_loss"], json.dumps(r["expert_error"].get("solution")))
    wandb.log({"pmq/test/mean": record["mean"], "pmq/test/hmean": record["hmean"],
               "pmq/fp_merge/hmean": record["fp_merge"]["hmean"], "pmq/layers": table,
               **{f"pmq/test/acc_{d}": a for d, a in record["per_domain"].items()}})
    wandb.finish()

