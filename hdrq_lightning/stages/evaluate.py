"""Stage `evaluate`: the task's score (accuracy, or mIoU with per-class IoU) of any stage's model on every target domain,
and their harmonic mean; for a quantized merge, optionally over several noise-sampled merges (merge samples)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import DictConfig

from hdrq_lightning.artifacts import read_json, write_json
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.evaluation import evaluate_domains
from hdrq_lightning.models.io import model_file, read_metadata
from hdrq_lightning.report import wandb_run
from hdrq_lightning.stages.common import (
    build_datamodule,
    build_task,
    load_model,
    notice,
    stage_run,
    start_fresh_if_forced,
)
from hdrq_lightning.stages.settings import recorded_config, stage_settings

# Stages whose run dirs hold a model that `evaluate` can score.
MODEL_STAGES = ("source", "adapt", "quantize", "merge", "pmq")


def run_reference(cfg: DictConfig, value: str) -> tuple[str, ...]:
    """``evaluate.run`` as (stage, key...) of a finished model run inside ``<runs_dir>/<experiment>``.

    Relative values are taken under that folder, absolute ones must resolve inside it. Anything else (``..``, the
    experiment folder itself, another experiment, a path outside the runs) is refused: the evaluation's own output
    dir is derived from it, and ``force=true`` clears that dir.
    """
    root = Path(cfg.paths.runs_dir, cfg.name)
    given = Path(str(value))
    resolved = (given if given.is_absolute() else root / given).resolve()
    example = "e.g. evaluate.run=merge/hdrq_w4a4 or evaluate.run=adapt/<target>"
    if root.resolve() not in resolved.parents:
        raise ConfigError(f"evaluate.run={value!r} resolves to {resolved}, which is not a run dir inside {root}; "
                          f"give a run of this experiment as <stage>/<key...> ({example}).")
    parts = resolved.relative_to(root.resolve()).parts
    if parts[0] not in MODEL_STAGES or len(parts) < 2:
        raise ConfigError(f"evaluate.run={value!r} is not a model run: give <stage>/<key...> with the stage one of "
                          f"{', '.join(MODEL_STAGES)} ({example}).")
    return parts


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def merge_samples(cfg: DictConfig, parts: tuple[str, ...], weights: Path) -> int:
    """How many merges to evaluate: ``evaluate.merge_samples`` for a merge of quantized experts (each sample is one
    complete noise-sampled merge), 1 for anything else (an FP merge has no randomness)."""
    wanted = int(cfg.evaluate.get("merge_samples", 1) or 1)
    if wanted < 1:
        raise ConfigError(f"evaluate.merge_samples={wanted} must be at least 1.")
    if parts[0] != "merge" or read_metadata(weights).get("format") != "quantized":
        return 1
    return wanted


def shard(value: str) -> tuple[int, int]:
    """``evaluate.sample_shard`` "k/K" as (k, K): this job evaluates samples k, k + K, k + 2K, ..."""
    try:
        k, count = (int(part) for part in str(value).split("/"))
    except ValueError:
        k = count = -1
    if not 0 <= k < count:
        raise ConfigError(f"evaluate.sample_shard={value!r} is not k/K with 0 <= k < K (e.g. 0/4 ... 3/4).")
    return k, count


def evaluate_merge_samples(cfg: DictConfig, dm, task, run, weights: Path, digest: str, samples: int,
                           part: tuple[int, int]) -> list[dict]:
    """Sample s (of ``part`` = (k, K): s = k, k + K, ...) is the merge with seed ``merge.params.seed + s``
    (sample 0 is the merge stage's own file), evaluated on every target; each is written to
    ``samples/<s>.json`` (atomic, with the merged file's digest) and reused by later calls. Returns every
    sample 0..N-1 (all must exist when ``part`` covers all)."""
    from hdrq_lightning.models.build import architecture, build_model
    from hdrq_lightning.models.io import file_architecture, integer_model
    from hdrq_lightning.stages.merge import merge_method, quantized_experts, quantized_merge

    folder = run.dir / "samples"
    base_seed = int(cfg.merge.params.get("seed", cfg.seed))
    experts = None
    metadata = read_metadata(weights)  # the merged file's numerics and architecture: every sample shares them
    results = []
    for s in range(samples):
        path = folder / f"{s:04d}.json"
        record = read_json(path) if path.is_file() else None
        if record is not None and record.get("model_sha256") == digest and record.get("seed") == base_seed + s:
            results.append(record)
            continue
        if s % part[1] != part[0]:
            continue
        if s == 0:
            model = load_model(cfg, dm.num_classes, weights, train=False)
        else:
            experts = experts if experts is not None else quantized_experts(cfg, dm.targets)
            state, _ = quantized_merge(cfg, dm.targets, merge_method(cfg, seed=base_seed + s), experts)
            network = build_model(file_architecture(weights, architecture(cfg.model, dm.num_classes)))
            model = integer_model(network, state, metadata)
        result = evaluate_domains(model, dm, list(dm.targets), task=task)
        record = {"sample": s, "seed": base_seed + s, "model_sha256": digest, **result}
        write_json(path, record)
        notice.info("evaluate %s: merge sample %d/%d (seed %d): harmonic mean %.2f", run.dir.name, s + 1, samples,
                    base_seed + s, result["hmean"])
        results.append(record)
    return results


def _mean_std(values: list[float]) -> dict[str, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    std = float(tensor.std(unbiased=True)) if len(values) > 1 else 0.0
    return {"mean": round(float(tensor.mean()), 4), "std": round(std, 4)}


def summarize_samples(records: list[dict]) -> dict:
    """The merge samples' mean (the headline numbers, as the paper reports the mean over its samples) and
    standard deviation per domain, of the per-sample harmonic means and, for segmentation, per class."""
    domains = list(records[0]["per_domain"])
    per_domain = {d: _mean_std([r["per_domain"][d] for r in records]) for d in domains}
    hmean = _mean_std([r["hmean"] for r in records])
    out = {"per_domain": {d: stats["mean"] for d, stats in per_domain.items()}, "hmean": hmean["mean"],
           "mean": _mean_std([r["mean"] for r in records])["mean"],
           "merge_samples": {"n": len(records), "seeds": [r["seed"] for r in records], "per_domain": per_domain,
                             "hmean": hmean,
                             "per_sample": [{"seed": r["seed"], "per_domain": r["per_domain"], "hmean": r["hmean"]}
                                            for r in records]}}
    if "per_class" in records[0]:
        per_class = {}
        for d in domains:
            columns = zip(*(r["per_class"][d] for r in records))
            per_class[d] = [None if any(v is None for v in column) else _mean_std(list(column))["mean"]
                            for column in columns]
        out["per_class"] = per_class
        out["merge_samples"]["per_class"] = {d: [r["per_class"][d] for r in records] for d in domains}
    return out


def run_evaluate(cfg: DictConfig) -> dict:
    if not cfg.evaluate.run:
        raise ConfigError("hdrq evaluate needs evaluate.run=<stage>/<key...>, a run dir under "
                          f"{Path(cfg.paths.runs_dir) / cfg.name} (e.g. evaluate.run=merge/hdrq_w4a4).")
    return evaluate_run(cfg, *run_reference(cfg, cfg.evaluate.run))


def evaluate_run(cfg: DictConfig, *parts: str) -> dict:
    dm = build_datamodule(cfg)
    source = stage_run(cfg, *parts)
    run = stage_run(cfg, "evaluate", *parts)
    weights = model_file(source.dir)
    digest = file_digest(weights)
    if run.is_done() and not cfg.force and run.metrics().get("model_sha256") != digest:
        # derived data of a model file that has been replaced since (its stage re-run with force=true): stale
        notice.info("re-evaluating %s: %s changed since it was evaluated", "/".join(parts), weights)
        run.clear()
    samples = merge_samples(cfg, parts, weights)
    if samples > 1 and cfg.evaluate.get("sample_shard") and cfg.force:
        raise ConfigError("force=true with evaluate.sample_shard would let every shard job clear the samples the "
                          "others write; clear the evaluation once with an unsharded force=true call (or delete its "
                          "samples/ folder), then run the shards without force.")
    if run.is_done() and not cfg.force and run.metrics().get("merge_samples", {}).get("n", 1) != samples:
        notice.info("re-evaluating %s with %d merge samples (finished samples are reused)", "/".join(parts), samples)
        run.metrics_path.unlink()
    if not start_fresh_if_forced(cfg, run):
        return run.metrics()
    task = build_task(cfg)
    merge_config = recorded_config(source) or cfg  # the merge's own settings (params, seed) make the samples
    if samples > 1 and cfg.evaluate.get("sample_shard"):
        # one shard of the samples (a sweep job): computed and kept, the aggregate is the unsharded call's
        run.dir.mkdir(parents=True, exist_ok=True)
        evaluate_merge_samples(merge_config, dm, task, run, weights, digest, samples,
                               shard(cfg.evaluate.sample_shard))
        return {"stage": "evaluate", "sample_shard": cfg.evaluate.sample_shard}
    run.prepare(cfg)
    if samples > 1:
        result = summarize_samples(evaluate_merge_samples(merge_config, dm, task, run, weights, digest, samples,
                                                          (0, 1)))
    else:
        model = load_model(cfg, dm.num_classes, weights, train=False)
        result = evaluate_domains(model, dm, list(dm.targets), task=task)
    unit = "%" if task.metric_name == "accuracy" else f" {task.metric_name}"
    notice.info("evaluate %s: %s, harmonic mean %.2f%s%s", "/".join(parts), result["per_domain"], result["hmean"],
                unit, f" (mean of {samples} merge samples)" if samples > 1 else "")
    recorded = recorded_config(source)  # what the evaluated model was made with, not this command's other groups
    wandb = wandb_run(cfg, run.dir, "evaluate", "evaluate/" + "/".join(parts), ["evaluate", *parts],
                      config={"run": "/".join(parts),
                              **(stage_settings(recorded, source.stage) if recorded is not None else {})})
    if wandb is not None:
        wandb.log({"evaluate/test/hmean": result["hmean"],
                   **{f"evaluate/test/acc_{d}": a for d, a in result["per_domain"].items()}})
        wandb.finish()
    return run.finish({"stage": "evaluate", "model": str(weights), "model_sha256": digest, **result})
