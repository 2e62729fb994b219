"""Quantized accuracy of the engine's eager path against its fast path, through `hdrq quantize` (a benchmark).

    python bench/paths_accuracy.py -- quant=brecq,qdrop,hdrq quant.w_bits=4,3 'quant.a_bits=${quant.w_bits}' \
        data.targets=[negative]

Runs the same multirun of the quantize stage once per path, each in its own runs dir that starts with a copy of
the experiment's source and adapt runs (from ``--runs``, default runs/; run `hdrq source` and `hdrq adapt` first),
and tabulates every expert's FP and quantized accuracy and seconds per path. The paths are the runtime overrides
in PATHS: the fast ones are the README's GPU recipe (Inductor-compiled loss, whole-step CUDA graphs, channels-last,
TF32, the compile-ahead worker on), with torch's QDrop masks ("fast", "fast_bf16": as measured before the mask
kernels), or with bf16 convolutions and the mask kernels ("fast_bf16_masks"); compiled runs draw their own random
numbers, so the paths agree in distribution, not bit for bit. Writes <out>/paths_accuracy.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_FAST = ["quant.runtime.compile=true", "quant.runtime.cuda_graphs=true", "quant.runtime.channels_last=true",
         "quant.runtime.tf32=true", "quant.runtime.steps_per_batch=25"]
PATHS = {
    "eager": [],  # `hdrq quantize`'s defaults (uncaptured: torch's QDrop masks, mask_kernel=null)
    # the paths measured before the mask kernels keep torch's masks, so their names keep their measured meaning
    "fast": [*_FAST, "quant.runtime.mask_kernel=false"],
    "fast_bf16": [*_FAST, "quant.runtime.bf16=true", "quant.runtime.mask_kernel=false"],  # + bf16 convolutions
    "fast_bf16_masks": [*_FAST, "quant.runtime.bf16=true", "quant.runtime.mask_kernel=true"],  # + masks by kernels
}


def run_path(name: str, overrides: list[str], sweep: list[str], experiment_runs: Path, work: Path) -> dict:
    """One multirun of the quantize stage with ``overrides``; returns its experts' metrics and its log facts."""
    runs_dir = work / name
    for stage in ("source", "adapt"):
        shutil.copytree(experiment_runs / stage, runs_dir / experiment_runs.name / stage)
    command = [sys.executable, "-m", "hdrq_lightning.cli", "quantize", "-m", *sweep, *overrides,
               f"paths.runs_dir={runs_dir}", "trainer.enable_progress_bar=false"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    # the compile-ahead lines go to the runs' log files, not to the terminal
    output = done.stdout + done.stderr + "".join(log.read_text(errors="replace") for log in runs_dir.rglob("*.log"))
    if done.returncode:
        sys.exit(f"the {name} path failed (exit {done.returncode}):\n{output[-4000:]}")
    experts = [json.loads(path.read_text()) for path in
               sorted((runs_dir / experiment_runs.name / "quantize").glob("*/*/metrics.json"))]
    return {"path": name, "overrides": overrides, "seconds": round(seconds, 1),
            "compile_ahead_workers": len(re.findall(r"compile-ahead worker \d+ compiles", output)),
            "experts": [{key: expert[key] for key in
                         ("method", "w_bits", "a_bits", "target", "fp_acc", "quant_acc", "seconds", "device")}
                        for expert in experts]}


def table(results: list[dict]) -> str:
    names = [result["path"] for result in results]
    header = ["method", "bits", "target", "FP %"] + [f"{name} %" for name in names] + [f"{name} s" for name in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = {}
    for result in results:
        for expert in result["experts"]:
            key = (expert["method"], f"W{expert['w_bits']}A{expert['a_bits']}", expert["target"])
            rows.setdefault(key, {"fp": expert["fp_acc"]})[result["path"]] = expert
    for key, row in sorted(rows.items()):
        cells = [*key, f"{row['fp']:.2f}"]
        cells += [f"{row[name]['quant_acc']:.2f}" if name in row else "-" for name in names]
        cells += [f"{row[name]['seconds']:.1f}" if name in row else "-" for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="runs dir holding the experiment's source and adapt runs")
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("sweep", nargs="+", help="the multirun's overrides (after --)")
    args = parser.parse_args()
    experiment_runs = Path(args.runs, args.experiment)
    for stage in ("source", "adapt"):
        if not (experiment_runs / stage).is_dir():
            sys.exit(f"{experiment_runs / stage} is missing: run `hdrq {stage} experiment={args.experiment}` first "
                     f"(or point --runs at the runs dir that holds it).")
    sweep = [f"experiment={args.experiment}", *args.sweep]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hdrq-paths-") as work:
        results = []
        for name in args.paths:
            results.append(run_path(name, PATHS[name], sweep, experiment_runs, Path(work)))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "experts"}), flush=True)
            # after every path: a run cut short keeps the paths it finished
            (out / "paths_accuracy.json").write_text(json.dumps({"sweep": sweep, "results": results}, indent=2))
            (out / "paths_accuracy.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
