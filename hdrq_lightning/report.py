"""The pipeline's summary: summary.json, a Table-2-shaped summary.md, comparison plots, a W&B table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from hdrq_lightning.analysis import BarrierCurve, plot_barrier_curves, plot_method_comparison, plot_pmq_anchor
from hdrq_lightning.artifacts import write_json, write_text


def _cell(entry: dict[str, Any], domains: list[str]) -> str:
    experts = " ".join(f"{entry['experts'][d]:.2f}" for d in domains)
    return f"**{entry['merged']['hmean']:.2f}** ({experts})"


def _hmean(values: list[float]) -> float:
    return 0.0 if any(v <= 0 for v in values) else len(values) / sum(1.0 / v for v in values)


def _iou(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _per_class_h(merged: dict[str, Any], domains: list[str]) -> list[float | None]:
    """Per-class harmonic mean over the domains, averaged over the merge samples (as the paper averages
    per-sample values); from the mean per-class IoUs where there are no samples. None: absent in a domain."""
    samples = merged.get("merge_samples", {}).get("per_class")
    runs = [[samples[d][i] for d in domains] for i in range(len(samples[domains[0]]))] if samples else \
        [[merged["per_class"][d] for d in domains]]
    out = []
    for c in range(len(runs[0][0])):
        values = [[row[c] for row in run] for run in runs]
        if any(v is None for vs in values for v in vs):
            out.append(None)
            continue
        out.append(sum(_hmean(vs) for vs in values) / len(values))
    return out


def _std(merged: dict[str, Any], key: str, domain: str | None = None) -> str:
    stats = merged.get("merge_samples")
    if not stats:
        return ""
    entry = stats["hmean"] if domain is None else stats["per_domain"][domain]
    return f" ± {entry['std']:.2f}"


def segmentation_markdown(summary: dict[str, Any]) -> str:
    """Table 1 of the paper: (a) each expert on its own target, (b) the merged model on each target and H; per
    class IoU and mIoU (mean over merge samples ± their standard deviation), then the paper's numbers if given."""
    domains, classes = summary["targets"], summary["classes"]
    fp = summary["fp"]
    rows = [("FP", "W32A32", fp), *((r["method"], f"W{r['w_bits']}A{r['a_bits']}", r) for r in summary["results"])]
    head = "| Method | Bits | Target | " + " | ".join(classes) + " | mIoU |"
    rule = "|---|---|---|" + "---|" * (len(classes) + 1)
    n = max((r["merged"].get("merge_samples", {}).get("n", 1) for r in summary["results"]), default=1)
    lines = [f"# {summary['experiment']}: {summary['source']} -> {', '.join(domains)} (Table 1)", "",
             "(a) Each expert on its own target: IoU per class and mIoU (%).", "", head, rule]
    for method, bits, entry in rows:
        per_class = entry.get("experts_per_class", {})
        for d in domains:
            cells = [_iou(v) for v in per_class[d]] if d in per_class else ["-"] * len(classes)
            lines.append(f"| {method} | {bits} | {d} | " + " | ".join(cells) + f" | **{entry['experts'][d]:.2f}** |")
    lines += ["", f"(b) The merged model on each target and the harmonic mean H over the targets (per class and "
              f"mIoU); quantized merges: mean over {n} merge samples ± standard deviation.", "", head, rule]
    for method, bits, entry in rows:
        merged = entry["merged"]
        for d in domains:
            cells = [_iou(v) for v in merged["per_class"][d]] if "per_class" in merged else ["-"] * len(classes)
            lines.append(f"| {method} | {bits} | {d} | " + " | ".join(cells)
                         + f" | **{merged['per_domain'][d]:.2f}**{_std(merged, 'per_domain', d)} |")
        cells = [_iou(v) for v in _per_class_h(merged, domains)] if "per_class" in merged else ["-"] * len(classes)
        lines.append(f"| {method} | {bits} | H | " + " | ".join(cells)
                     + f" | **{merged['hmean']:.2f}**{_std(merged, 'hmean')} |")
    lines += ["", "Source-only mIoU: " + ", ".join(f"{d} {summary['source_only'][d]:.2f}" for d in domains)]
    if summary.get("reference"):
        lines += ["", *reference_markdown(summary, rows)]
    return "\n".join(lines)


def reference_markdown(summary: dict[str, Any], rows: list[tuple[str, str, dict]]) -> list[str]:
    """Ours beside the paper's mIoU (the experiment's ``reference`` block): experts, merged per target, H."""
    domains = summary["targets"]
    reference = summary["reference"]
    lines = [f"Beside the paper ({reference.get('source', 'reference')}): ours / paper (difference), mIoU.", "",
             "| Method | Bits | " + " | ".join([*(f"expert {d}" for d in domains), *(f"merged {d}" for d in domains),
                                               "H"]) + " |", "|---|---|" + "---|" * (2 * len(domains) + 1)]
    for method, bits, entry in rows:
        paper = reference.get("rows", {}).get(f"{method}_{bits}".lower())
        ours = [*(entry["experts"][d] for d in domains), *(entry["merged"]["per_domain"][d] for d in domains),
                entry["merged"]["hmean"]]
        if paper is None:
            cells = [f"{v:.2f} / -" for v in ours]
        else:
            cells = [f"{v:.2f} / {p:.2f} ({v - p:+.2f})" for v, p in zip(ours, paper)]
        lines.append(f"| {method} | {bits} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(summary: dict[str, Any]) -> str:
    """Rows: methods; columns: bit widths; cell: merged harmonic mean (experts' per-domain accuracies).
    Segmentation summaries are Table 1 instead (``segmentation_markdown``), followed by the analysis."""
    if summary.get("task") == "segmentation":
        return segmentation_markdown(summary) + "\n" + "\n".join(analysis_markdown(summary)) + "\n"
    domains = summary["targets"]
    if not summary["results"]:
        return "\n".join(fp_markdown(summary) + analysis_markdown(summary)
                         + (["", *pmq_markdown(summary["pmq"])] if summary.get("pmq") else [])) + "\n"
    bits = list(dict.fromkeys(f"W{r['w_bits']}A{r['a_bits']}" for r in summary["results"]))
    methods = list(dict.fromkeys(r["method"] for r in summary["results"]))
    lines = [
        f"# {summary['experiment']}: {summary['source']} -> {', '.join(domains)}",
        "",
        "Merged-model harmonic mean of the per-domain accuracies (%); in parentheses the quantized experts' "
        f"accuracies on their own target ({', '.join(domains)}).",
        "",
        "| Method | " + " | ".join(bits) + " |",
        "|---|" + "---|" * len(bits),
        "| FP (W32A32) | " + " | ".join([_cell(summary["fp"], domains)] * len(bits)) + " |",
    ]
    by_key = {(r["method"], f"W{r['w_bits']}A{r['a_bits']}"): r for r in summary["results"]}
    for method in methods:
        cells = [_cell(by_key[(method, b)], domains) if (method, b) in by_key else "-" for b in bits]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    fp = summary["fp"]
    lines += ["", "FP merged per domain: " + ", ".join(f"{d} {fp['merged']['per_domain'][d]:.2f}" for d in domains)
              + "; source-only accuracy: " + ", ".join(f"{d} {summary['source_only'][d]:.2f}" for d in domains)]
    lines += analysis_markdown(summary)
    if summary.get("pmq"):
        lines += ["", *pmq_markdown(summary["pmq"])]
    return "\n".join(lines) + "\n"


def fp_markdown(summary: dict[str, Any]) -> list[str]:
    """The full-precision models per target when no quantize-then-merge method ran (``pipeline.methods=[]``, e.g.
    the post-merge benchmark): the source model (for task benchmarks: the base with its heads), the experts on
    their own targets, the FP merge."""
    domains = summary["targets"]
    fp = summary["fp"]

    def row(name: str, scores: dict[str, float]) -> str:
        values = [scores[d] for d in domains]
        entry = {"per_domain": scores, "mean": sum(values) / len(values), "hmean": _hmean(values)}
        return f"| {name} | {_pmq_cells(entry, domains)} |"

    return [f"# {summary['experiment']}: {summary['source']} -> {', '.join(domains)}", "",
            "Full-precision models, accuracy (%) per target, mean and harmonic mean H.", "",
            "| Model | " + " | ".join(domains) + " | mean | H |", "|---|" + "---|" * (len(domains) + 2),
            row(f"source ({summary['source']})", summary["source_only"]),
            row("experts (each on its own target)", fp["experts"]),
            row(f"FP merge ({summary.get('fp_merge', 'merge')})", fp["merged"]["per_domain"])]


def analysis_markdown(summary: dict[str, Any]) -> list[str]:
    if not summary.get("analysis"):
        return []
    pair = " + ".join(next(iter(summary["analysis"].values()))["pair"])
    score = "pixel accuracy" if summary.get("task") == "segmentation" else "accuracy"
    lines = ["", f"Analysis of the two-expert merge {pair} (analysis/<method>_w<W>a<A>/*.png):", "",
             f"| Method | error barrier (loss, Eq. 3) | merged H of the {score}, random noise sample (mean) | "
             "with cosine selection (mean) |", "|---|---|---|---|"]
    for tag, item in summary["analysis"].items():
        lines.append(f"| {tag} | {item['barrier'][tag]:.4f} | {item['samples_mean']['random sample']:.2f} | "
                     f"{item['samples_mean']['cosine selection']:.2f} |")
    lines.append(f"\nFP error barrier (Eq. 2): {summary['fp_barrier']:.4f}")
    return lines


PMQ_ROW_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "epmq": "E-PMQ"}


def _pmq_cells(entry: dict[str, Any], domains: list[str]) -> str:
    return " | ".join([*(f"{entry['per_domain'][d]:.2f}" for d in domains), f"{entry['mean']:.2f}",
                       f"**{entry['hmean']:.2f}**"])


def pmq_markdown(block: dict[str, Any]) -> list[str]:
    """Post-merge quantization: one table per weight bit width; rows merge x {FP merge, methods, relaxation}."""
    domains = block["targets"]
    a_bits = f"A{block['a_bits']}" if block.get("a_bits") else " weight-only"
    lines = ["Post-merge quantization (`hdrq pmq`: merge the FP experts, then quantize once; pmq/<run>/): accuracy "
             "(%) of the merged model per target, mean and harmonic mean. The relaxation is E-PMQ's target W* "
             "left in float: below it, the loss is the quantizer's; between it and the FP merge, the objective's."]
    header = ["", "| Merge | Model | " + " | ".join(domains) + " | mean | H |",
              "|---|---|" + "---|" * (len(domains) + 2)]
    for w_bits in block["bits"]:
        lines += ["", f"W{w_bits}{a_bits}:", *header]
        for merge in dict.fromkeys(r["merge"] for r in block["rows"]):
            lines.append(f"| {merge} | FP merge | {_pmq_cells(block['fp_merge'][merge], domains)} |")
            for row in block["rows"]:
                if row["merge"] != merge or (row["quantize"] and row["w_bits"] != w_bits):
                    continue
                name = PMQ_ROW_NAMES.get(row["method"], row["method"])
                name = f"{name} relaxation (float)" if not row["quantize"] else name
                lines.append(f"| {merge} | {name} | {_pmq_cells(row, domains)} |")
    if block.get("layer_errors"):
        lines += ["", f"Output deviation from the experts on the deployed input, ||(W_t - Q) x~|| / ||W_t x~||, mean "
                  f"over targets and layers at W{block['bits'][-1]} (per layer: summary.json, pmq/<run>/layers.json):",
                  ""]
        for merge, entry in block["layer_errors"].items():
            parts = [f"{name} {sum(v) / len(v):.4f}" for name, v in entry.items() if name != "layers"]
            lines.append(f"- {merge}: " + ", ".join(parts))
    if block.get("anchor_sweep"):
        lines += ["", f"E-PMQ anchor strength mu (relative to mean diag H) at W{block['bits'][-1]}, mean accuracy "
                  "(pmq_anchor.png):", "", "| Merge | " + " | ".join(
                      f"mu={p['mu']:g}" for p in next(iter(block["anchor_sweep"].values()))) + " |",
                  "|---|" + "---|" * len(next(iter(block["anchor_sweep"].values())))]
        for merge, points in block["anchor_sweep"].items():
            lines.append(f"| {merge} | " + " | ".join(f"{p['mean']:.2f}" for p in points) + " |")
    return lines


def plot_pmq(out_dir: Path, block: dict[str, Any]) -> list[Path]:
    """pmq_anchor.png when the block has an anchor sweep: E-PMQ's mean accuracy against mu per merge, with the FP
    merge and GPTQ at the same bit width as lines."""
    if not block.get("anchor_sweep"):
        return []
    w_bits = block["bits"][-1]
    curves = {merge: [(p["mu"], p["mean"]) for p in points] for merge, points in block["anchor_sweep"].items()}
    references = {}
    for merge in curves:
        references[merge] = {"FP merge": block["fp_merge"][merge]["mean"]}
        gptq = [r for r in block["rows"] if r["merge"] == merge and r["method"] == "gptq" and r["quantize"]
                and r["w_bits"] == w_bits]
        if gptq:
            references[merge][f"GPTQ W{w_bits}"] = gptq[0]["mean"]
    return [plot_pmq_anchor(curves, out_dir / "pmq_anchor.png", references,
                            title=f"E-PMQ W{w_bits}: mean accuracy against the anchor strength")]


def write_summary(out_dir: Path, summary: dict[str, Any], barrier_curves: dict[str, BarrierCurve]) -> list[Path]:
    write_json(out_dir / "summary.json", summary)
    write_text(out_dir / "summary.md", summary_markdown(summary))
    bit_labels = dict.fromkeys(f"W{r['w_bits']}A{r['a_bits']}" for r in summary["results"])
    rows = [{"method": "FP", "bits": bits, "hmean": summary["fp"]["merged"]["hmean"]} for bits in bit_labels]
    rows += [{"method": r["method"], "bits": f"W{r['w_bits']}A{r['a_bits']}", "hmean": r["merged"]["hmean"]}
             for r in summary["results"]]
    plots = [plot_method_comparison(rows, out_dir / "comparison.png",
                                    title=f"{summary['experiment']}: merged harmonic mean")] if rows else []
    if barrier_curves:
        first = next(iter(summary.get("analysis", {}).values()), {})
        pair = " + ".join(first.get("pair", [])) or "two experts"
        bits = f"W{first['w_bits']}A{first['a_bits']}" if "w_bits" in first else ""
        plots.append(plot_barrier_curves(
            barrier_curves, out_dir / "barrier.png",
            title=f"error barrier along the merge path {pair}, {bits} (FP: Eq. 2, quantized: Eq. 3)"))
    if summary.get("pmq"):
        plots += plot_pmq(out_dir, summary["pmq"])
    return plots


def wandb_run(cfg: DictConfig, run_dir: Path, job_type: str, name: str, tags: list[str],
              config: dict[str, Any] | None = None):
    """A W&B run for a stage without a Trainer (evaluate, pipeline summary), or None when W&B is off.

    Grouped by experiment like the Trainer stages; the id kept in the run dir, so a re-run (or a stage adding its
    final metrics after its Trainer's run closed) continues it. ``config``: what the run was made with (default:
    the quantization and merge settings of ``cfg``).
    """
    if not cfg.logger.get("wandb"):
        return None
    import wandb

    from hdrq_lightning.artifacts import StageRun

    return wandb.init(project=cfg.logger.project, entity=cfg.logger.get("entity"), group=cfg.name,
                      job_type=job_type, name=name, id=StageRun(run_dir).wandb_id(), resume="allow",
                      dir=str(run_dir), mode="online" if cfg.logger.mode == "online" else "offline", tags=tags,
                      config=config if config is not None else {
                          "quant": {"method": cfg.quant.method, "w_bits": cfg.quant.w_bits,
                                    "a_bits": cfg.quant.a_bits}, "merge": cfg.merge.method})


def log_summary_to_wandb(cfg: DictConfig, out_dir: Path, summary: dict[str, Any], images: list[Path]) -> None:
    """One W&B run (job_type=pipeline) with the summary table and the plots, grouped with the stages' runs."""
    run = wandb_run(cfg, out_dir, "pipeline", "pipeline/summary", ["summary", *cfg.pipeline.methods])
    if run is None:
        return
    import wandb

    domains = summary["targets"]
    table = wandb.Table(columns=["method", "w_bits", "a_bits", "merged_hmean", *[f"merged_{d}" for d in domains],
                                 *[f"expert_{d}" for d in domains]])
    for r in [{"method": "fp", "w_bits": 32, "a_bits": 32, **summary["fp"]}, *summary["results"]]:
        table.add_data(r["method"], r["w_bits"], r["a_bits"], r["merged"]["hmean"],
                       *[r["merged"]["per_domain"][d] for d in domains], *[r["experts"][d] for d in domains])
    logged: dict[str, Any] = {"summary": table}
    if summary.get("pmq"):
        block = summary["pmq"]
        pmq_table = wandb.Table(columns=["merge", "method", "w_bits", "a_bits", "quantize", "mean", "hmean",
                                         *[f"acc_{d}" for d in block["targets"]]])
        for merge, fp in block["fp_merge"].items():
            pmq_table.add_data(merge, "fp_merge", 32, 32, False, fp["mean"], fp["hmean"],
                               *[fp["per_domain"][d] for d in block["targets"]])
        for r in block["rows"]:
            pmq_table.add_data(r["merge"], r["method"], r["w_bits"], r["a_bits"], r["quantize"], r["mean"],
                               r["hmean"], *[r["per_domain"][d] for d in block["targets"]])
        logged["pmq"] = pmq_table
    run.log({**logged, **{p.stem: wandb.Image(str(p)) for p in images}})
    run.finish()
