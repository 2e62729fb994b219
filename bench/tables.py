"""The README's performance tables, generated from the result files in bench/results/ (not typed by hand).

    python bench/tables.py --write    # rewrite every generated block of README.md
    python bench/tables.py --check    # exit 1 when a block differs from what the files give (a test runs this)

A block is the text between ``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->`` in the README; ``TABLES``
maps each name to the function that renders it from the JSON rows (each with its GPU, date, commit and command,
bench/provenance.py). A new measurement is a new file in bench/results/ and a ``--write``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _when(record: dict) -> str:
    date, commit = record.get("date"), record.get("commit")
    if not date:
        return "-"
    return f"{date} ({commit})" if commit and len(commit) <= 12 else date


def eager_vs_official() -> str:
    """Per ResNet-50 unit type: the official step's transcription, the engine's eager step and its graphs-only
    path, ms per iteration, and the sums over the model's units."""
    eager = _load("eager_vs_official_h200_resnet50.json")
    graphs = _load("eager_vs_official_h200_resnet50_graphs.json")
    units = eager["units"]
    count = sum(row["units"] for row in units.values())
    lines = [f"| ResNet-50 unit (QDrop W4A4, batch 32), ms/iter | {' | '.join(units)} | sum over the {count} units |",
             "|" + "---|" * (len(units) + 2)]
    rows = [("official step (transcription)", units, "official_ms", eager),
            ("engine, eager", units, "eager_ms", eager),
            ("engine, eager kernels in CUDA graphs (`cuda_graphs=true`, no compile)", graphs["units"], "graphs_ms",
             graphs)]
    for label, table, key, record in rows:
        summed = record["summed_ms_per_iter"][key.removesuffix("_ms")]
        lines.append(f"| {label} | " + " | ".join(f"{table[u][key]:.1f}" for u in units) + f" | **{summed}** |")
    lines.append(f"\n({eager.get('gpu') or eager['device']}, {_when(eager)}; graphs row: {_when(graphs)}; "
                 "`bench/results/eager_vs_official_h200_resnet50*.json`)")
    return "\n".join(lines)


def jobs_per_gpu() -> str:
    """Jobs per hour with k jobs at once on one GPU, a row per bench/jobs_per_gpu.py result file."""
    records = [(path.name, json.loads(path.read_text())) for path in sorted(RESULTS.glob("jobs_per_gpu_*.json"))]
    slots = sorted({r["slots"] for _, record in records for r in record["results"]})
    lines = ["| jobs (bench/full_run.py arguments), jobs per hour with k at once | " +
             " | ".join(f"k = {k}" for k in slots) + " | GPU | date (commit) | file |",
             "|" + "---|" * (len(slots) + 4)]
    for name, record in records:
        job = " ".join(arg for arg in record["job"][1:])
        by_slots = {r["slots"]: r for r in record["results"]}
        cells = [("-" if k not in by_slots else f"{by_slots[k]['jobs_per_hour']}" +
                  (f" (**{by_slots[k]['speedup']}x**)" if k != slots[0] else "")) for k in slots]
        lines.append(f"| `{job}` | " + " | ".join(cells) +
                     f" | {record['gpu'].replace('NVIDIA ', '')} | {_when(record)} | `{name}` |")
    return "\n".join(lines)


def full_runs() -> str:
    """Every whole-model run (bench/full_run.py) in the results, fastest model first within a GPU."""
    lines = ["| GPU | model | method | path | it/unit run | whole model at 20k it/unit | one-off | peak GiB | caches | "
             "date (commit) | file |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    records = []
    for path in sorted(RESULTS.glob("full_run_*.json")):
        record = json.loads(path.read_text())
        args = record.get("args", {})
        records.append((record.get("device", "?"), args.get("model"), args.get("method"), args.get("path"), path.name,
                        record, args))
    for device, model, method, run_path, name, record, args in sorted(records, key=lambda r: r[:5]):
        ranks = f", rank {record['rank']} of {record['world']}" if record.get("world", 1) > 1 else ""
        measured = "measured" if args.get("iters") == args.get("target_iters") else "extrapolated"
        lines.append(f"| {device.replace('NVIDIA ', '')} | {model} | {method} | {run_path}{ranks} | {args.get('iters')}"
                     f" | {record['extrapolated_minutes']} min ({measured}) | {record['one_off_minutes']} min | "
                     f"{record['peak_gib']} | {record.get('cache', '-')} | {_when(record)} | `{name}` |")
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {"eager_vs_official": eager_vs_official, "jobs_per_gpu": jobs_per_gpu,
                                        "full_runs": full_runs}


def render(text: str) -> str:
    """``text`` with every generated block replaced by what the result files give."""
    for name, table in TABLES.items():
        pattern = re.compile(rf"(<!-- bench:{name} [^>]*-->\n)(.*?)(<!-- /bench:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no generated block {name!r} (<!-- bench:{name} ... --> ... "
                             f"<!-- /bench:{name} -->)")
        text = pattern.sub(lambda m, t=table: m.group(1) + t() + "\n" + m.group(3), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    readme = Path(args.readme)
    current = readme.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's generated tables differ from bench/results/: run python bench/tables.py --write",
                  file=sys.stderr)
            sys.exit(1)
        print("README.md's generated tables match bench/results/")
        return
    if wanted != current:
        readme.write_text(wanted)
        print(f"rewrote the generated tables of {readme}")


if __name__ == "__main__":
    main()
