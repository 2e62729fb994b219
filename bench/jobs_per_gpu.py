"""Jobs per hour on one GPU with k reconstruction jobs running on it at once (a benchmark, not a test).

    python bench/jobs_per_gpu.py --slots 1 2 4 --jobs 4 -- --model resnet50 --method qdrop --path fast --iters 800

Runs ``--jobs`` copies of ``bench/full_run.py <args>`` (a whole-model reconstruction cut to a fixed iteration
count) for each k in ``--slots`` (or ``--jobs-per-slot`` x k of them), k processes at a time on the same GPU, and
times the batch from the first start to the last end. Real-length jobs in one 10-minute device call (about 1 min a
job on an H200 with a warm cache, half of it steady steps):

    python bench/jobs_per_gpu.py --slots 1 2 4 --jobs-per-slot 1 -- --model resnet50 --method qdrop \
        --path fast_bf16 --iters 2000
 One job runs first and is not counted: it fills the shared Inductor cache
(``TORCHINDUCTOR_CACHE_DIR``), as the first job of a sweep does, so every timed job starts warm. Writes
<out>/jobs_per_gpu_<name>.json with jobs per hour per k and the speed-up over k = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_batch(job_args: list[str], jobs: int, slots: int, workdir: Path, env: dict[str, str]) -> dict:
    """``jobs`` runs of full_run.py, ``slots`` at a time: wall seconds and each job's own figures."""
    workdir.mkdir(parents=True, exist_ok=True)
    pending, running, finished = list(range(jobs)), [], []
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < slots:
            index = pending.pop(0)
            out = workdir / f"s{slots}_j{index}"
            log = open(workdir / f"s{slots}_j{index}.log", "w")
            process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "full_run.py"), *job_args, "--out",
                                        str(out)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((index, process, out, log, time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            index, process, out, log, job_start = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            if process.returncode:
                raise SystemExit(f"job {index} (k={slots}) failed: {(workdir / f's{slots}_j{index}.log').read_text()[-3000:]}")
            (result,) = [json.loads(p.read_text()) for p in out.glob("full_run_*.json")]
            finished.append({"job": index, "seconds": round(time.perf_counter() - job_start, 1),
                             "trainer_seconds": result["wall_seconds"], "peak_gib": result["peak_gib"]})
    wall = time.perf_counter() - started
    return {"slots": slots, "jobs": jobs, "wall_seconds": round(wall, 1),
            "jobs_per_hour": round(jobs * 3600 / wall, 1), "per_job": sorted(finished, key=lambda r: r["job"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--jobs-per-slot", type=int, default=None,
                        help="run this many times k jobs for each k (instead of --jobs for every k)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="resnet50")
    parser.add_argument("--no-warmup", action="store_true", help="skip the uncounted cache-filling job")
    parser.add_argument("job_args", nargs="+", help="full_run.py's arguments (after --)")
    args = parser.parse_args()
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ind_jobs_"))
    workdir = Path(tempfile.mkdtemp(prefix="jobs_per_gpu_"))
    warmup = None
    if not args.no_warmup:
        warmup = run_batch(args.job_args, 1, 1, workdir / "warmup", env)
        print("warm-up (not counted):", warmup, flush=True)
    import torch

    rows = []
    for slots in args.slots:  # the file is rewritten after each k: a run cut short keeps what it measured
        jobs = args.jobs if args.jobs_per_slot is None else args.jobs_per_slot * slots
        rows.append(run_batch(args.job_args, jobs, slots, workdir, env))
        print({k: v for k, v in rows[-1].items() if k != "per_job"}, flush=True)
        for row in rows:
            row["speedup"] = round(row["jobs_per_hour"] / rows[0]["jobs_per_hour"], 2)
        write_result(args.out, f"jobs_per_gpu_{args.name}.json",
                     {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "cache": "warm (shared TORCHINDUCTOR_CACHE_DIR, filled by an uncounted first job)"
                      if warmup else "as found", "job": ["bench/full_run.py", *args.job_args],
                      "warmup": warmup, "results": rows})
    print(json.dumps([{k: v for k, v in r.items() if k != "per_job"} for r in rows], indent=2))


if __name__ == "__main__":
    main()
