"""Stages end to end on tiny settings: artifacts, skip-when-done, compatibility checks and resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from resume import HANG, killed_resumed_and_uninterrupted, same_tensors
from tiny import TINY

from hdrq_lightning.artifacts import load_weights, read_json
from hdrq_lightning.errors import ArtifactError
from hdrq_lightning.quant.export import load_integer_file
from hdrq_lightning.stages.adapt import run_adapt
from hdrq_lightning.stages.evaluate import evaluate_run
from hdrq_lightning.stages.merge import run_merge
from hdrq_lightning.stages.quantize import run_quantize
from hdrq_lightning.stages.source import run_source


def test_source_adapt_quantize_merge_evaluate(compose_cfg, tmp_path):
    source = run_source(compose_cfg("source"))
    run_dir = tmp_path / "runs" / "digits" / "source" / "clean"
    assert source["status"] == "done" and set(source["test_acc"]) == {"clean", "negative", "textured", "rotated"}
    for name in ("config.yaml", "metrics.json", "model.safetensors", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert load_weights(run_dir / "model.safetensors")  # safetensors: opening it runs no code

    adapted = run_adapt(compose_cfg("adapt"))
    assert set(adapted) == {"negative", "textured", "rotated"}
    assert all({"source_only_acc", "adapted_acc"} <= set(m) for m in adapted.values())

    quantized = run_quantize(compose_cfg("quantize", "quant=qdrop", "quant.w_bits=4", "quant.a_bits=4"))
    for target, metrics in quantized.items():
        state, meta = load_integer_file(tmp_path / f"runs/digits/quantize/qdrop_w4a4/{target}/quantized.safetensors")
        assert meta["format"] == "quantized" and {"fp_acc", "quant_acc"} <= set(metrics)
        for key, codes in state.items():
            if key.endswith(".weight_int"):
                layer = key.removesuffix(".weight_int")
                assert codes.dtype in (torch.int8, torch.int16)
                assert int(codes.min()) >= int(state[f"{layer}.weight_qmin"])
                assert int(codes.max()) <= int(state[f"{layer}.weight_qmax"])

    cfg = compose_cfg("merge", "quant=qdrop")
    run_merge(cfg)
    result = evaluate_run(cfg, "merge", "qdrop_w4a4")
    assert set(result["per_domain"]) == {"negative", "textured", "rotated"} and 0 <= result["hmean"] <= 100

    # per-module numerics overrides: a finished run with other overrides is refused, naming the key; with force the
    # written experts carry the overridden grids, and the merge and evaluation rebuild them from the files
    layer4 = ["quant=qdrop", "quant.w_bits=4", "quant.a_bits=4",
              "quant.overrides=[{modules: 'backbone.layer4.*', w_bits: 6, w_per_channel: false}]"]
    with pytest.raises(ArtifactError, match="quant.overrides"):
        run_quantize(compose_cfg("quantize", *layer4))
    run_quantize(compose_cfg("quantize", *layer4, "force=true"))
    state, _ = load_integer_file(tmp_path / "runs/digits/quantize/qdrop_w4a4/negative/quantized.safetensors")
    assert int(state["backbone.layer4.0.conv1.weight_qmax"]) == 63 and state["backbone.layer4.0.conv1.weight_scale"].numel() == 1
    assert int(state["backbone.layer3.0.conv1.weight_qmax"]) == 15
    run_merge(compose_cfg("merge", *layer4, "force=true"))
    assert 0 <= evaluate_run(compose_cfg("merge", *layer4), "merge", "qdrop_w4a4")["hmean"] <= 100

    # finished stages are skipped (same metrics, nothing rewritten) ...
    written = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert run_source(compose_cfg("source"))["test_acc"] == source["test_acc"]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == written
    # ... and a later stage refuses inputs made with another data configuration, naming the key
    with pytest.raises(ArtifactError, match=r"data.image_size: 32 -> 28"):
        run_adapt(compose_cfg("adapt", "data.image_size=28", "force=true"))


def test_later_stage_without_inputs_is_a_clear_error(compose_cfg):
    with pytest.raises(ArtifactError, match="run `hdrq source` first"):
        run_adapt(compose_cfg("adapt"))


def test_killed_adapt_resumes_from_its_last_checkpoint_to_the_same_weights(compose_cfg, tmp_path):
    """Killed after its first epoch's checkpoint and re-run, adapt resumes and ends with the weights of an
    uninterrupted run, bit for bit on the CPU (each epoch's data order and augmentation are functions of the
    seed and the epoch, not of the process's RNG history)."""
    run_source(compose_cfg("source"))
    resumed, uninterrupted, log = killed_resumed_and_uninterrupted(
        ["adapt", *TINY, "adapt.epochs=3", "data.targets=[negative]"], tmp_path / "runs", "digits/adapt/negative",
        "digits/source", tmp_path)
    target_dir = tmp_path / "runs/digits/adapt/negative"
    assert f"resuming adapt/negative from checkpoint {target_dir / 'checkpoints/last.ckpt'}" in log
    assert read_json(target_dir / "metrics.json")["status"] == "done"
    assert same_tensors(resumed, uninterrupted)
    assert (read_json(target_dir / "metrics.json")["adapted_acc"]
            == read_json(tmp_path / "runs_uninterrupted/digits/adapt/negative/metrics.json")["adapted_acc"])


@pytest.mark.slow  # two gloo processes through the CLI (~50 s); test_distributed.py checks the equality fast
def test_data_parallel_quantize_through_the_cli(compose_cfg, tmp_path):
    """`hdrq quantize trainer=ddp`: Lightning starts rank 1 by re-running the command line it finds in sys.argv,
    which must come back to the same stage (2 CPU processes over gloo)."""
    run_source(compose_cfg("source"))
    run_adapt(compose_cfg("adapt", "data.targets=[negative]"))
    env = {**os.environ, "HDRQ_RUNS_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "hdrq_lightning.cli", "quantize", *TINY, "quant=qdrop", "data.targets=[negative]",
            "trainer=ddp", "trainer.devices=2"]
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    # Lightning's messages go to the log files (one per rank: Lightning names rank 1's job), not to the terminal
    logs = " ".join(path.read_text() for path in (tmp_path / "runs/digits/hydra/quantize").glob("*.log"))
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    metrics = read_json(tmp_path / "runs/digits/quantize/qdrop_w4a4/negative/metrics.json")
    assert metrics["status"] == "done" and 0 <= metrics["quant_acc"] <= 100
    # force=true: rank 0 clears the run dir before rank 1 starts; rank 1 must not clear what rank 0 then wrote
    done = subprocess.run([*args, "force=true"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert log.count("force=true: clearing") == 1
    assert read_json(tmp_path / "runs/digits/quantize/qdrop_w4a4/negative/metrics.json")["status"] == "done"


@pytest.mark.slow
def test_data_parallel_sweep_through_the_cli(compose_cfg, tmp_path):
    """`hdrq quantize -m ... trainer=ddp`: rank 1 re-runs the whole multirun and walks it in step with rank 0."""
    run_source(compose_cfg("source"))
    run_adapt(compose_cfg("adapt", "data.targets=[negative]"))
    env = {**os.environ, "HDRQ_RUNS_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "hdrq_lightning.cli", "quantize", "-m", *TINY, "quant=qdrop,hdrq",
            "data.targets=[negative]", "trainer=ddp", "trainer.devices=2"]
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for method in ("qdrop", "hdrq"):
        assert read_json(tmp_path / f"runs/digits/quantize/{method}_w4a4/negative/metrics.json")["status"] == "done"
