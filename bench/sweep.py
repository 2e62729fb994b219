"""Speed-up of a quantization sweep on 1..N GPUs of one machine (a benchmark, not a test).

    python bench/sweep.py --gpus 1 2 -- quant=brecq,qdrop,hdrq quant.w_bits=4,3 'quant.a_bits=${quant.w_bits}'

Runs the same Hydra multirun (`hdrq quantize -m <sweep>`) once per GPU count with the joblib launcher and
`n_jobs` = GPU count (force=true: every run does all the work); every worker process claims its own GPU
(hdrq_lightning/gpus.py). Needs the source and adapt runs of the experiment (run `hdrq source`
and `hdrq adapt` first) and hydra-joblib-launcher. Writes <out>/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("sweep", nargs="+", help="the multirun's overrides (after --)")
    args = parser.parse_args()
    results = []
    for gpus in args.gpus:
        command = [sys.executable, "-m", "hdrq_lightning.cli", "quantize", "-m", *args.sweep,
                   "hydra/launcher=joblib", f"hydra.launcher.n_jobs={gpus}", "trainer.enable_progress_bar=false",
                   "force=true"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        output = done.stdout + done.stderr
        claimed = sorted(set(re.findall(r"claimed GPU (\d+)", output)))
        jobs = len(re.findall(r"\t#\d+ : ", output))
        results.append({"gpus": gpus, "jobs": jobs, "seconds": round(seconds, 1), "returncode": done.returncode,
                        "gpus_claimed": claimed})
        print(results[-1], flush=True)
        if done.returncode:
            print(output[-4000:], file=sys.stderr)
            break
    base = results[0]["seconds"]
    for row in results:
        row["speedup"] = round(base / row["seconds"], 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"sweep": args.sweep, "results": results}, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
