"""Nothing lost, nothing silently wrong: user paths stay inside the runs, force clears only a stage's own dir,
finished runs are reused only with their own settings, bad input is one paragraph and leaves no run dir."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import ONE_TARGET, TINY

from hdrq_lightning.artifacts import StageRun, save_weights
from hdrq_lightning.errors import ArtifactError, ConfigError
from hdrq_lightning.stages.evaluate import run_evaluate
from hdrq_lightning.stages.merge import run_merge
from hdrq_lightning.stages.quantize import run_quantize
from hdrq_lightning.stages.source import run_source


def _tree(root: Path) -> dict[str, int]:
    """Every file under root with its modification time: what a deletion or a rewrite would change."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_evaluate_paths_outside_the_runs_are_refused_and_force_deletes_nothing(compose_cfg, finished, tmp_path):
    before = _tree(finished)
    for value in ("..", ".", "adapt/../..", str(tmp_path), str(finished), "/etc", "adapt", "hydra/source",
                  "../other_experiment/adapt/negative"):
        with pytest.raises(ConfigError, match="evaluate.run="):
            run_evaluate(compose_cfg("evaluate", ONE_TARGET, f"evaluate.run={value}", "force=true"))
        assert _tree(finished) == before, f"evaluate.run={value} force=true changed the runs"
    # an absolute path inside the runs is the same run as its relative form: evaluated into evaluate/adapt/negative
    result = run_evaluate(compose_cfg("evaluate", ONE_TARGET, f"evaluate.run={finished / 'adapt/negative'}",
                                      "force=true"))
    assert result["status"] == "done" and set(result["per_domain"]) == {"negative"}
    assert (finished / "evaluate/adapt/negative/metrics.json").is_file()
    assert {k: v for k, v in _tree(finished).items() if not k.startswith("evaluate/")} == before


def test_clear_refuses_anything_but_a_dir_inside_the_stage_root(tmp_path):
    root = tmp_path / "runs/digits/evaluate"
    (root / "merge/x").mkdir(parents=True)
    (tmp_path / "runs/digits/adapt/negative").mkdir(parents=True)
    for target in (root, root / "..", root / "../adapt/negative", tmp_path):
        with pytest.raises(ArtifactError, match="refusing to delete"):
            StageRun(target, root=root).clear()
    with pytest.raises(ArtifactError, match="refusing to delete"):
        StageRun(root / "merge/x").clear()  # no root: not known to be a stage's own dir
    StageRun(root / "merge/x", root=root).clear()
    assert not (root / "merge/x").exists() and (tmp_path / "runs/digits/adapt/negative").is_dir()


def test_a_finished_run_is_reused_only_with_its_own_settings(compose_cfg, finished):
    qdrop = finished / "quantize/qdrop_w4a4/negative"
    before = _tree(qdrop)
    # other iterations: refused, naming the key and force=true; nothing rewritten
    with pytest.raises(ArtifactError, match=r"quant\.iters: 12 -> 20.*force=true"):
        run_quantize(compose_cfg("quantize", ONE_TARGET, "quant=qdrop", "quant.iters=20"))
    assert _tree(qdrop) == before
    # runtime options are not settings: reused
    reused = run_quantize(compose_cfg("quantize", ONE_TARGET, "quant=qdrop", "quant.runtime.log_every=3",
                                      "quant.checkpoint_every=4", "trainer.log_every_n_steps=2"))
    assert reused["negative"]["w_bits"] == 4 and _tree(qdrop) == before
    # a source re-run with other settings is refused too, and so is an adapt made from that source's settings
    with pytest.raises(ArtifactError, match=r"source\.lr: 0\.05 -> 0\.1"):
        run_source(compose_cfg("source", ONE_TARGET, "source.lr=0.1"))
    with pytest.raises(ArtifactError, match=r"source\.lr"):
        run_quantize(compose_cfg("quantize", ONE_TARGET, "quant=qdrop", "source.lr=0.1", "force=true"))

    # W4A4 run dirs copied into the W3A3 slot: neither quantize nor merge takes them for W3A3
    shutil.copytree(finished / "quantize/qdrop_w4a4", finished / "quantize/qdrop_w3a3")
    with pytest.raises(ArtifactError, match=r"quant\.w_bits: 4 -> 3"):
        run_quantize(compose_cfg("quantize", ONE_TARGET, "quant=qdrop", "quant.w_bits=3", "quant.a_bits=3"))
    with pytest.raises(ArtifactError, match=r"quant\.a_bits: 4 -> 3"):
        run_merge(compose_cfg("merge", ONE_TARGET, "quant=qdrop", "quant.w_bits=3", "quant.a_bits=3"))
    assert not (finished / "merge/qdrop_w3a3").exists()
    # ... even when the copied dir's config says W3A3: the expert's own record says what it holds
    config = finished / "quantize/qdrop_w3a3/negative/config.yaml"
    config.write_text(config.read_text().replace("w_bits: 4", "w_bits: 3").replace("a_bits: 4", "a_bits: 3"))
    with pytest.raises(ArtifactError, match=r"holds a qdrop W4A4 expert, but this merge is qdrop W3A3"):
        run_merge(compose_cfg("merge", ONE_TARGET, "quant=qdrop", "quant.w_bits=3", "quant.a_bits=3"))
    assert not (finished / "merge/qdrop_w3a3").exists()


def test_merge_plugins_refuse_experts_of_the_other_kind(compose_cfg, finished):
    with pytest.raises(ConfigError, match="merges float experts.*integer ones"):
        run_merge(compose_cfg("merge", ONE_TARGET, "quant=qdrop", "merge=quantized", "merge.method=mean"))
    with pytest.raises(ConfigError, match="merges integer experts.*float ones"):
        run_merge(compose_cfg("merge", ONE_TARGET, "merge=fp", "merge.method=quantized"))
    assert not (finished / "merge").exists()


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage" * 100, None])
def test_a_corrupt_model_file_is_one_clear_error_naming_it(compose_cfg, finished, content):
    weights = finished / "adapt/negative/model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2] if content is None else content)  # None: truncated
    with pytest.raises(ArtifactError, match=f"{weights}.*not a readable safetensors file.*force=true"):
        run_quantize(compose_cfg("quantize", ONE_TARGET, "quant=brecq"))
    assert not (finished / "quantize/brecq_w4a4").exists()


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HDRQ_RUNS_DIR": str(tmp_path / "runs"), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "hdrq_lightning.cli", *args, *TINY], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)


@pytest.mark.parametrize("args, words", [
    (("quantize", "quant.w_bits=abc"), "quant.w_bits='abc' is not an integer"),
    (("quantize", "quant=qdrop", "quant.w_bits=4.5"), "quant.w_bits=4.5 is not an integer"),
    (("source", "model.checkpoint_path=/nonexistent/weights.safetensors"), "/nonexistent/weights.safetensors"),
    (("merge", "quant=qdrop"), "run `hdrq quantize` first"),
    (("evaluate", "evaluate.run=.."), "evaluate.run='..'"),
    (("quantize", "quant=nonexistent"), "quant/nonexistent"),  # Hydra's own config error: the same exit code
])
def test_bad_input_is_one_paragraph_and_leaves_no_run_dir(tmp_path, args, words):
    result = _cli(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and words in " ".join(result.stderr.split())
    stages = tmp_path / "runs/digits"
    made = [p for p in stages.iterdir() if p.name != "hydra"] if stages.exists() else []
    assert made == [], f"left behind: {made}"


def test_identical_weight_files_are_identical_bytes(tmp_path):
    state = {"b.weight": torch.arange(6.0).view(2, 3), "a.bias": torch.ones(3)}
    metadata = {"format": "quantized", "stage": "quantize", "target": "negative", "method": "hdrq",
                "quant_config": json.dumps({"w_bits": 4}), "zeta": "é"}
    digests = set()
    for index in range(6):  # safetensors orders its metadata by a hash map: differs from write to write
        path = save_weights(state, tmp_path / f"w{index}.safetensors", metadata)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "w0.safetensors"), framework="pt") as handle:
        assert handle.metadata() == metadata
        blob = (tmp_path / "w0.safetensors").read_bytes()
        header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
        assert list(header["__metadata__"]) == sorted(metadata)
        assert all(torch.equal(handle.get_tensor(k), v) for k, v in state.items())


def test_run_dir_files_get_the_umask_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_weights({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_stage_prints_its_progress_and_result_and_leaves_the_details_to_the_log(tmp_path):
    """One progress line and the result on the terminal; Lightning's INFO lines, tips and model summaries only in the
    log file."""
    result = _cli(tmp_path, "source", "trainer.enable_progress_bar=true")
    assert result.returncode == 0, result.stderr[-2000:]
    shown = result.stdout + result.stderr
    for noise in ("GPU available", "TPU available", "Tip:", "Total params", "stopped: `max_epochs"):
        assert noise not in shown, noise
    assert "source clean" in shown and "test accuracy" in shown
    log = (tmp_path / "runs/digits/hydra/source/cli.log").read_text()
    assert "GPU available" in log and "test accuracy" in log
    assert len(shown.strip().splitlines()) < 15, shown


def test_wall_clock_of_a_resumed_run_counts_the_earlier_processes():
    from hdrq_lightning.callbacks.wall_clock import WallClock

    first = WallClock(started=0.0)  # started at perf_counter 0: it has run for perf_counter() seconds
    saved = first.state_dict()["seconds"]
    resumed = WallClock()
    resumed.load_state_dict({"seconds": saved})
    assert resumed.total_seconds() >= saved > 0
