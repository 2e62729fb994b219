"""The benchmark scripts run (a CPU smoke run on a tiny model) and their arithmetic holds.

They are timed on GPUs by hand (README, bench/results); here they must not rot between those runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--image", "16", "--calibration", "32", "--batch", "8"]


def run_bench(script: str, *args: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_reconstruction_bench_times_every_unit_type_and_mode(tmp_path):
    run_bench("reconstruction.py", "--models", "resnet_tiny", "--methods", "qdrop", "hdrq", "--paths", "eager",
              "--iters", "3", "--warmup", "1", "--out", str(tmp_path), *TINY)
    results = json.loads((tmp_path / "reconstruction.json").read_text())["results"]
    assert [(r["method"], r["path"]) for r in results] == [("qdrop", "eager"), ("hdrq", "eager")]
    qdrop, hdrq = (r["units"] for r in results)
    # resnet_tiny: stem, one block per stage (4), head; HDRQ times each in its noise and its fake-quant mode
    assert list(qdrop) == ["stem", "layer1.first", "layer2.first", "layer3.first", "layer4.first", "head"]
    assert list(hdrq) == [name for kind in qdrop for name in (f"{kind}:noise", kind)]
    for row in [*qdrop.values(), *hdrq.values()]:
        assert row["units"] == 1 and row["ms_per_iter"] > 0 and row["gflop_per_iter"] >= 0
    # whole model = the one-off costs + 20k iterations of every unit at its type's ms/iter (rounding: 0.1 min)
    expected = sum(row["ms_per_iter"] for row in qdrop.values()) * 20000 / 1000 / 60
    assert abs(results[0]["extrapolated_minutes"] - results[0]["overhead_minutes"] - expected) < 0.15
    markdown = (tmp_path / "reconstruction.md").read_text()
    assert "| resnet_tiny | hdrq | eager |" in markdown


@pytest.mark.parametrize("method", ["hdrq", "brecq"])
def test_full_run_extrapolated_to_its_own_length_is_its_wall_time(tmp_path, method):
    """With --target-iters equal to --iters the extrapolation must give back the measured time: every
    interval between the unit timer's stamps is counted once, none twice (HDRQ: the noise switch splits each
    unit; BRECQ: two passes, the activation pass a quarter as long)."""
    run_bench("full_run.py", "--model", "resnet_tiny", "--method", method, "--path", "eager", "--iters", "100",
              "--target-iters", "100", "--steps-per-batch", "10", "--out", str(tmp_path),
              "--compile-bundles", str(tmp_path / "bundles"), *TINY)
    result = json.loads((tmp_path / f"full_run_resnet_tiny_{method}_eager.json").read_text())
    assert result["cache"] == "eager: no compile cache" and not (tmp_path / "bundles").exists()  # nothing compiled
    units = result["units"]
    passes = ["weights", "activations"] if method == "brecq" else ["joint"]
    blocks = ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "head"]
    assert [(u["pass"], u["unit"]) for u in units] == [(p, b) for p in passes for b in blocks]
    assert all(len(u["steady_ms_per_iter"]) == (2 if method == "hdrq" else 1) for u in units)
    assert (result["rank"], result["world"]) == (0, 1)
    # rounding: wall to 0.1 s, the extrapolation to 0.01 min
    assert abs(result["extrapolated_minutes"] * 60 - result["wall_seconds"]) < 0.7
    assert sum(u["seconds_at_target"] for u in units) <= result["wall_seconds"] + 0.1 * len(units)


@pytest.mark.slow
def test_full_run_data_parallel_writes_one_file_per_rank(tmp_path):
    run_bench("full_run.py", "--model", "resnet_tiny", "--method", "qdrop", "--path", "eager", "--iters", "40",
              "--steps-per-batch", "10", "--devices", "2", "--out", str(tmp_path), *TINY)
    ranks = [json.loads((tmp_path / f"full_run_resnet_tiny_qdrop_eager_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert [u["unit"] for u in ranks[0]["units"]] == [u["unit"] for u in ranks[1]["units"]]


def test_noise_fidelity_check_runs_and_holds_on_the_cpu(tmp_path):
    run_bench("noise_fidelity.py", "--device", "cpu", "--elements", "300000", "--no-compile", "--out", str(tmp_path))
    (eager,) = json.loads((tmp_path / "noise_fidelity_cpu.json").read_text())["forms"]
    assert eager["zeros_kept"] and eager["ks_vs_rounding_error"] < 0.02 and eager["ks_vs_mirror"] > 0.5
    assert abs(eager["noise_mean"] - eager["rounding_error_mean"]) < 0.005


def test_eager_vs_official_times_both_steps_on_every_unit_type(tmp_path):
    run_bench("eager_vs_official.py", "--model", "resnet_tiny", "--iters", "2", "--warmup", "1", "--profile",
              "--table", "none", "--out", str(tmp_path), *TINY)
    result = json.loads((tmp_path / "eager_vs_official_resnet_tiny.json").read_text())
    units = result["units"]
    assert list(units) == ["stem", "layer1.first", "layer2.first", "layer3.first", "layer4.first", "head"]
    for row in units.values():
        assert row["eager_ms"] > 0 and row["official_ms"] > 0 and row["eager_kernels"] > row["official_kernels"] / 2
    summed = sum(row["eager_ms"] for row in units.values())
    assert abs(result["summed_ms_per_iter"]["eager"] - summed) < 0.1
    assert result["commit"] and result["torch"] == __import__("torch").__version__


@pytest.mark.slow
def test_jobs_per_gpu_runs_k_jobs_at_a_time(tmp_path):
    run_bench("jobs_per_gpu.py", "--slots", "1", "2", "--jobs", "2", "--no-warmup", "--out", str(tmp_path), "--",
              "--model", "resnet_tiny", "--method", "qdrop", "--path", "eager", "--iters", "20",
              "--steps-per-batch", "10", *TINY)
    result = json.loads((tmp_path / "jobs_per_gpu_resnet50.json").read_text())
    assert [(r["slots"], r["jobs"], len(r["per_job"])) for r in result["results"]] == [(1, 2, 2), (2, 2, 2)]
    assert result["results"][0]["speedup"] == 1.0
    run_bench("jobs_per_gpu.py", "--slots", "1", "2", "--jobs-per-slot", "1", "--no-warmup", "--out", str(tmp_path),
              "--name", "per_slot", "--", "--model", "resnet_tiny", "--method", "qdrop", "--path", "eager", "--iters",
              "20", "--steps-per-batch", "10", *TINY)
    result = json.loads((tmp_path / "jobs_per_gpu_per_slot.json").read_text())
    assert [(r["slots"], r["jobs"]) for r in result["results"]] == [(1, 1), (2, 2)]


def test_readme_tables_are_generated_from_the_result_files():
    """The README's generated blocks equal what bench/tables.py renders from bench/results/ (a new measurement:
    a new result file and `python bench/tables.py --write`)."""
    run_bench("tables.py", "--check")


def test_vit_recipe_probe_runs(tmp_path):
    run_bench("vit_recipe.py", "--configs", "8,32,1,1,1e-3", "--out", str(tmp_path))
    (row,) = json.loads((tmp_path / "vit_recipe_cpu.json").read_text())["runs"]
    assert row["patch"] == 8 and 0 <= row["test_acc"] <= 100 and row["epochs"] == 1
