"""Stage `pipeline`: the whole study (Table 2 for classification, Table 1 for segmentation) in one command,
reusing every finished stage."""

from __future__ import annotations

import math
import re
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hdrq_lightning.analysis import BarrierCurve, plot_loss_surface
from hdrq_lightning.artifacts import read_json
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.gpus import data_parallel
from hdrq_lightning.report import log_summary_to_wandb, write_summary
from hdrq_lightning.stages.adapt import run_adapt
from hdrq_lightning.stages.analyze import run_analyze
from hdrq_lightning.stages.common import build_datamodule, build_task, stage_run
from hdrq_lightning.stages.evaluate import evaluate_run
from hdrq_lightning.stages.merge import merge_key, run_merge
from hdrq_lightning.stages.pmq import pmq_key, run_pmq
from hdrq_lightning.stages.quantize import run_quantize
from hdrq_lightning.stages.source import run_source

# Overrides the pipeline sets itself for each variant.
_OWN_KEYS = re.compile(r"^[~+]*(quant|merge|stage|pmq)(=|\.w_bits=|\.a_bits=|\.method=|\.merge\.method=|\.quantize=|"
                       r"\.tag=|\.params\.anchor_strength=)")
_PMQ_PARAMS = re.compile(r"^[~+]*pmq\.(params|select)\.")


def parse_bits(label: str) -> tuple[int, int]:
    match = re.fullmatch(r"W(\d+)A(\d+)", str(label).upper())
    if not match:
        raise ConfigError(f"pipeline.bits entry {label!r} is not of the form W<bits>A<bits> (e.g. W4A4).")
    return int(match.group(1)), int(match.group(2))


def variant(overrides: list[str], extra: list[str], keep_pmq_params: bool = True) -> DictConfig:
    """The config of one pipeline step: the user's overrides plus the step's own (quant preset, bits, merge).
    ``keep_pmq_params``: the user's ``pmq.params.*`` and ``pmq.select.*`` overrides apply (they are about the
    parameters of the user's ``pmq.method``, not of the other post-merge methods the pipeline runs)."""
    kept = [o for o in overrides if not _OWN_KEYS.match(o) and (keep_pmq_params or not _PMQ_PARAMS.match(o))]
    return compose(config_name="config", overrides=[*kept, *extra])


def replot_surfaces_on_one_scale(cfg: DictConfig, keys: list[str]) -> None:
    """Redraw every method's ``surface.png`` with the colour scale of all of them, so that one colour is one loss
    in every method's plot (each analyze run draws its own on its own range)."""
    runs = [stage_run(cfg, "analysis", key).dir for key in keys]
    records = [read_json(run / "analysis.json") for run in runs]
    values = [v for r in records for row in r["surface"]["losses"] for v in row if math.isfinite(v)]
    if not values:
        return
    for run, record in zip(runs, records):
        surface = record["surface"]
        title = f"loss surface: {record['method']} W{record['w_bits']}A{record['a_bits']}, " \
                f"{' + '.join(record['pair'])} ({record['pair'][0]}); colour scale shared by all methods"
        plot_loss_surface(surface["alphas"], surface["betas"], surface["losses"], run / "surface.png", title=title,
                          value_range=(min(values), max(values)))


def layer_errors(cfg: DictConfig, rows: list[dict]) -> dict[str, dict[str, list]]:
    """Per merge, the layers in order and, per method, each layer's output deviation from the experts on the
    deployed input (mean over targets; layers.json's ``expert_error.deployed_input``), with the FP merge's."""
    out: dict[str, dict[str, list]] = {}
    for row in rows:
        path = Path(cfg.paths.runs_dir, cfg.name, row["run"], "layers.json")
        records = [r for r in read_json(path) if r["expert_error"]]
        if not records or any("deployed_input" not in r["expert_error"] for r in records):
            continue  # a method without statistics (RTN), or a run written before this record existed
        entry = out.setdefault(row["merge"], {"layers": [r["layer"] for r in records]})
        mean = lambda values: round(sum(values) / len(values), 5)  # noqa: E731
        entry.setdefault("FP merge", [mean(r["expert_error"]["deployed_input"]["merged"]) for r in records])
        entry[row["method"]] = [mean(r["expert_error"]["deployed_input"]["solution"]) for r in records]
    return out


def run_pmq_block(cfg: DictConfig, overrides: list[str], targets: list[str]) -> dict:
    """Post-merge quantization per merge method x method x weight bits, the relaxation, the anchor sweep."""
    p = cfg.pipeline.pmq
    a_bits = "null" if p.a_bits is None else p.a_bits

    def pmq(method: str, merge: str, w_bits: int, *extra: str) -> dict:
        pcfg = variant(overrides, ["stage=pmq", f"pmq={method}", f"pmq.merge.method={merge}", f"pmq.w_bits={w_bits}",
                                   f"pmq.a_bits={a_bits}", *extra], keep_pmq_params=method == cfg.pmq.method)
        result = run_pmq(pcfg)
        return {"merge": merge, "method": method, "w_bits": w_bits, "a_bits": p.a_bits,
                "quantize": result["quantize"], "per_domain": result["per_domain"], "mean": result["mean"],
                "hmean": result["hmean"], "run": f"pmq/{pmq_key(pcfg)}", "fp_merge": result["fp_merge"]}

    rows = [pmq(method, merge, w_bits) for w_bits in p.bits for merge in p.merges for method in p.methods]
    if p.relaxation:
        rows += [pmq("epmq", merge, p.bits[-1], "pmq.quantize=false") for merge in p.merges]
    fp = {}
    for row in rows:
        fp.setdefault(row["merge"], row.pop("fp_merge"))
    block = {"targets": targets, "bits": list(p.bits), "a_bits": p.a_bits, "fp_merge": fp, "rows": rows,
             "layer_errors": layer_errors(cfg, [r for r in rows if r["quantize"] and r["w_bits"] == p.bits[-1]])}
    if p.anchor_sweep:
        block["anchor_sweep"] = {merge: [
            {"mu": float(mu), **{k: v for k, v in pmq("epmq", merge, p.bits[-1], f"pmq.params.anchor_strength={mu}",
                                                       f"pmq.tag=mu{mu}").items()
                                 if k in ("mean", "hmean", "run")}} for mu in p.anchor_sweep] for merge in p.merges}
    return block


def _merged_entry(result: dict) -> dict:
    """A merged model's evaluation for the summary: per domain and H (the means over merge samples where there
    are several), per-class IoU (segmentation) and the merge-sample statistics."""
    entry = {"per_domain": result["per_domain"], "hmean": result["hmean"]}
    for key in ("per_class", "merge_samples"):
        if key in result:
            entry[key] = result[key]
    return entry


def run_pipeline(cfg: DictConfig) -> dict:
    if data_parallel(cfg.trainer):
        # Lightning's DDP re-runs the whole command per rank: every rank would run every stage of the pipeline
        raise ConfigError(
            "the pipeline runs in one process; trainer=ddp spreads one quantize job over GPUs. Run the "
            "reconstructions data-parallel first (`hdrq quantize -m quant=brecq,qdrop,hdrq quant.w_bits=4,3 "
            "'quant.a_bits=${quant.w_bits}' trainer=ddp trainer.devices=N`, with your experiment's overrides), "
            "then `hdrq pipeline` without trainer=ddp: it skips the finished quantize runs and merges, evaluates "
            "and analyses them.")
    if not HydraConfig.initialized():
        raise ConfigError("the pipeline composes a config per method and bit width: run it through the CLI "
                          "(`hdrq pipeline ...`).")
    overrides = list(HydraConfig.get().overrides.task)
    bit_widths = [parse_bits(b) for b in cfg.pipeline.bits]
    source = run_source(cfg)
    adapted = run_adapt(cfg)
    targets = list(adapted)

    fp_cfg = variant(overrides, ["stage=merge", "merge=fp", f"merge.method={cfg.pipeline.fp_merge}"])
    run_merge(fp_cfg)
    fp_merged = evaluate_run(fp_cfg, "merge", merge_key(fp_cfg))
    task = build_task(cfg)
    summary = {
        "experiment": cfg.name, "source": source["domain"], "targets": targets,
        "task": task.name, "metric": task.metric_name, "fp_merge": cfg.pipeline.fp_merge,
        "source_only": {t: adapted[t]["source_only_acc"] for t in targets},
        "fp": {"experts": {t: adapted[t]["adapted_acc"] for t in targets},
               "merged": _merged_entry(fp_merged)},
        "results": [],
    }
    if task.name == "segmentation":
        summary["classes"] = list(build_datamodule(cfg).classes)
    if cfg.get("reference"):
        summary["reference"] = OmegaConf.to_container(cfg.reference, resolve=True)
    draws = cfg.pipeline.get("merge_num_samples") or {}
    for method in cfg.pipeline.methods:
        for w_bits, a_bits in bit_widths:
            qcfg = variant(overrides, ["stage=quantize", f"quant={method}", f"quant.w_bits={w_bits}",
                                       f"quant.a_bits={a_bits}",
                                       *([f"merge.params.num_samples={draws[method]}"] if method in draws else [])])
            quantized = run_quantize(qcfg)
            run_merge(qcfg)
            merged = evaluate_run(qcfg, "merge", merge_key(qcfg))
            row = {
                "method": method, "w_bits": w_bits, "a_bits": a_bits,
                "experts": {t: quantized[t]["quant_acc"] for t in targets},
                "merged": _merged_entry(merged),
                "quantize_seconds": round(sum(quantized[t]["seconds"] for t in targets), 1),
            }
            if all("quant_per_class" in quantized[t] for t in targets):
                row["experts_per_class"] = {t: quantized[t]["quant_per_class"] for t in targets}
                summary["fp"].setdefault("experts_per_class", {t: quantized[t]["fp_per_class"] for t in targets})
            summary["results"].append(row)
    if cfg.pipeline.pmq.merges:
        summary["pmq"] = run_pmq_block(cfg, overrides, targets)
    curves: dict[str, BarrierCurve] = {}
    if cfg.pipeline.analysis and len(targets) >= 2:
        w_bits, a_bits = parse_bits(cfg.pipeline.analysis_bits or cfg.pipeline.bits[-1])
        summary["analysis"] = {}
        for method in cfg.pipeline.methods:
            acfg = variant(overrides, ["stage=analyze", f"quant={method}", f"quant.w_bits={w_bits}",
                                       f"quant.a_bits={a_bits}"])
            result = run_analyze(acfg)
            summary["analysis"][f"{method}_w{w_bits}a{a_bits}"] = result
            record = read_json(stage_run(acfg, "analysis", merge_key(acfg)).dir / "analysis.json")
            curves.setdefault("FP", BarrierCurve(**record["barrier"]["FP"]))
            curves[method] = BarrierCurve(**record["barrier"][merge_key(acfg)])
        summary["fp_barrier"] = curves["FP"].barrier
        replot_surfaces_on_one_scale(cfg, [merge_key(variant(overrides, [
            "stage=analyze", f"quant={method}", f"quant.w_bits={w_bits}", f"quant.a_bits={a_bits}"]))
            for method in cfg.pipeline.methods])
    out_dir = Path(cfg.paths.runs_dir) / cfg.name
    images = write_summary(out_dir, summary, curves)
    log_summary_to_wandb(cfg, out_dir, summary, images)
    print((out_dir / "summary.md").read_text())
    log_file = Path(HydraConfig.get().runtime.output_dir) / f"{HydraConfig.get().job.name}.log"
    analysis = f"{out_dir / 'analysis'}/<method>_w<W>a<A>/*.png, " if "analysis" in summary else ""
    plots = ", ".join(p.name for p in images)
    print(f"outputs: {out_dir.resolve()}/summary.json, summary.md{', ' + plots if plots else ''}; {analysis}"
          f"every stage's run dir under {out_dir}/<stage>/; the full log: {log_file}")
    return summary
