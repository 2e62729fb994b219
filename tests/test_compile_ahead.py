"""The compile-ahead worker builds the engine's twin and steps every unit it has left, once per quantization mode,
and what it compiles is what the engine then loads from Inductor's caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engines import (
    THREE_BLOCK_STAGE_CONFIG,
    hdrq_engine_with_distance,
    started_engine,
    three_block_stage_model,
)

from hdrq_lightning.callbacks import compile_ahead
from hdrq_lightning.quant.recipe import Recipe, Runtime
from hdrq_lightning.quant.reconstruction import ReconstructionModule

TESTS = Path(__file__).resolve().parent


def test_ahead_recipe_switches_noise_to_fake_quant_between_its_two_steps():
    recipe = compile_ahead.ahead_recipe(Recipe(method="brecq", passes=["weights", "activations"]))
    assert (recipe.iters, recipe.act_iters, recipe.noise.switch_iteration(2), recipe.passes) == \
        (2, 2, 1, ["weights", "activations"])
    runtime = compile_ahead.ahead_runtime(Runtime(compile=True, cuda_graphs=True, cache_device="host"))
    assert runtime.compile and not runtime.cuda_graphs and not runtime.compile_ahead and \
        runtime.cache_device == "device"


def test_no_worker_on_the_cpu_without_compile_or_without_a_model_config(monkeypatch):
    compiled, eager = (hdrq_engine_with_distance(Runtime(compile=c)) for c in (True, False))
    assert compile_ahead.launch(compiled, THREE_BLOCK_STAGE_CONFIG) is None  # on the CPU
    monkeypatch.setattr(ReconstructionModule, "device", property(lambda self: torch.device("cuda", 0)))
    assert compile_ahead.launch(eager, THREE_BLOCK_STAGE_CONFIG) is None
    assert compile_ahead.launch(compiled, None) is None


@pytest.mark.parametrize("start_unit", [0, 5])
def test_worker_steps_the_units_left_twice_each(tmp_path, start_unit):
    """Eager payload (fast): the twin is built from the payload (models, loss terms that pickle, recipe) and runs
    two steps for each unit from the engine's current one on."""
    engine = hdrq_engine_with_distance(Runtime())
    engine.seek(engine.plan[start_unit].start)
    compile_ahead.write_payload(engine, tmp_path / "payload.pt", start=(start_unit, 0), model_config=THREE_BLOCK_STAGE_CONFIG)
    assert compile_ahead.run_worker(tmp_path / "payload.pt", "cpu") == 2 * (len(engine.plan) - start_unit)


def test_the_worker_starts_past_the_graph_the_engine_compiles_itself():
    """HDRQ before its noise switch: the twin starts at the current unit's fake-quant step; after it, or without
    noise (QDrop), at the next unit; nothing once the last unit is in its last mode."""
    hdrq = hdrq_engine_with_distance(Runtime())  # 6 iterations per unit, switch at 5
    last = hdrq.plan[-1].start
    starts = {}
    for step in (0, 4, 5, last + 4, last + 5):
        hdrq.seek(step)
        starts[step] = compile_ahead.ahead_start(hdrq)
    assert starts == {0: (0, 1), 4: (0, 1), 5: (1, 0), last + 4: (len(hdrq.plan) - 1, 1), last + 5: None}
    fp, calibration = three_block_stage_model()
    qdrop = started_engine(fp, calibration, Recipe(method="qdrop", iters=6, batch_size=8), Runtime())
    assert compile_ahead.ahead_start(qdrop) == (1, 0)


def test_worker_from_the_fake_quant_step_of_the_current_unit(tmp_path):
    engine = hdrq_engine_with_distance(Runtime())
    compile_ahead.write_payload(engine, tmp_path / "payload.pt", compile_ahead.ahead_start(engine), model_config=THREE_BLOCK_STAGE_CONFIG)
    twin = compile_ahead.build_twin(tmp_path / "payload.pt", "cpu")
    modes = []
    twin.step_hooks["record"] = lambda module: modes.append((module.phase.unit, _weight_modes(module)))
    while not twin.finished:
        twin.reconstruction_step()
    assert [block for block, _ in modes] == [0] + [b for b in range(1, len(engine.plan)) for _ in range(2)]
    assert [mode for _, mode in modes] == ["nearest"] + ["noise", "nearest"] * (len(engine.plan) - 1)


def _weight_modes(engine: ReconstructionModule) -> str:
    """The one weight-quantizer mode of the engine's current unit (after its step hooks ran)."""
    (mode,) = {layer.weight_quantizer.mode for _, layer in engine.current_layers()}
    return mode


@pytest.mark.parametrize("world", [(2, 0), (2, 1), (3, 2)])
def test_the_twin_of_a_ddp_rank_takes_that_ranks_slice_of_the_batch(tmp_path, world):
    """Every rank starts its own worker: a rank's graphs have its rows of the global batch (and its device)."""
    engine = hdrq_engine_with_distance(Runtime(), world=world)  # as under a Trainer with this world and rank
    compile_ahead.write_payload(engine, tmp_path / "payload.pt", start=(0, 0), model_config=THREE_BLOCK_STAGE_CONFIG)  # every unit
    twin = compile_ahead.build_twin(tmp_path / "payload.pt", "cpu")
    assert twin._local_slice() == engine._local_slice() != slice(0, engine.recipe.batch_size)
    drops = {q.batch_rows for q in twin.quant_units[0].modules() if hasattr(q, "batch_rows")}
    assert drops == {(8, engine._local_slice().start, engine._local_slice().stop)}


@pytest.mark.slow
@pytest.mark.parametrize("world", [(1, 0), (2, 1)])
def test_worker_fills_the_caches_the_engine_compiles_from(tmp_path, world):
    """A cold worker (its own process, Inductor on the CPU) compiles every graph; an engine started afterwards in
    another process finds them all: no FX-graph cache miss, every AOT-autograd graph a hit. Also for rank 1 of
    2 (the engine as a DDP rank sees it: its half of the global batch)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    engine = hdrq_engine_with_distance(Runtime(compile=True), world=world)
    compile_ahead.write_payload(engine, tmp_path / "payload.pt", start=(0, 0), model_config=THREE_BLOCK_STAGE_CONFIG)  # every unit
    subprocess.run([sys.executable, "-m", "hdrq_lightning.callbacks.compile_ahead", str(tmp_path / "payload.pt"), "cpu"],
                   env=env, check=True, capture_output=True)
    assert not (tmp_path / "payload.pt").exists()  # the worker process removes it once read
    code = ("import json, sys; sys.path.insert(0, sys.argv[1])\n"
            "from torch._dynamo.utils import counters\n"
            "from engines import hdrq_engine_with_distance\n"
            "from hdrq_lightning.quant.recipe import Runtime\n"
            f"engine = hdrq_engine_with_distance(Runtime(compile=True), world={world})\n"
            "while not engine.finished:\n"
            "    engine.reconstruction_step()\n"
            "print(json.dumps([counters['inductor'], counters['aot_autograd']]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(TESTS)], env=env, check=True, capture_output=True,
                          text=True)
    inductor, aot = json.loads(done.stdout.strip().splitlines()[-1])
    assert inductor.get("fxgraph_cache_miss", 0) == 0 and inductor["fxgraph_cache_hit"] == 28  # 7 shapes x 2 modes
    assert aot.get("autograd_cache_miss", 0) == 0 and aot["autograd_cache_hit"] == 14


def test_launch_skips_a_worker_for_loss_terms_that_do_not_pickle(monkeypatch):
    engine = hdrq_engine_with_distance(Runtime(compile=True))
    engine.loss_terms["local"] = compile_ahead  # a module object: not picklable
    monkeypatch.setattr(ReconstructionModule, "device", property(lambda self: torch.device("cuda", 0)))
    assert compile_ahead.launch(engine, THREE_BLOCK_STAGE_CONFIG) is None


def test_stopping_the_worker_reports_the_engines_cache_hits(tmp_path, caplog, monkeypatch):
    from torch._dynamo.utils import counters

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    monkeypatch.setitem(counters, "inductor", counters["inductor"].copy())
    worker = compile_ahead.CompileAhead(process, tmp_path / "worker")
    counters["inductor"]["fxgraph_cache_hit"] += 5
    counters["inductor"]["fxgraph_cache_miss"] += 2
    with caplog.at_level("INFO", logger="hdrq"):
        worker.stop()
    assert "5 loaded from the cache, 2 compiled by the engine itself" in caplog.text
    assert not (tmp_path / "worker").exists()
