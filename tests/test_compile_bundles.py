"""Portable compile bundles (callbacks/compile_bundles.py): a process with an empty Inductor cache that loads the
bundle another process wrote compiles nothing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny import ONE_TARGET

from hdrq_lightning.callbacks import compile_bundles
from hdrq_lightning.callbacks.compile_bundles import (
    CompileBundlesCallback,
    bundle_name,
    load_bundles,
    save_bundle,
)
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.quant.recipe import Runtime
from hdrq_lightning.stages.quantize import run_quantize

# one process: optionally load the folder's bundles through the callback, compile a convolution's forward and
# backward, add the bundle through the callback, print Inductor's cache counters and the callback's loaded count
SCRIPT = """
import json, sys
from types import SimpleNamespace
import torch
from torch._dynamo.utils import counters
from hdrq_lightning.callbacks.compile_bundles import CompileBundlesCallback
from hdrq_lightning.quant.recipe import Runtime

callback = CompileBundlesCallback(sys.argv[1])
module = SimpleNamespace(runtime=Runtime(compile=True))
callback.setup(None, module, "fit")
step = torch.compile(lambda x, w: torch.nn.functional.conv2d(x, w).relu().square().mean())
x, w = torch.randn(2, 3, 12, 12), torch.randn(4, 3, 3, 3, requires_grad=True)
step(x, w).backward()
callback.on_train_end(None, module)
print(json.dumps({"loaded": callback.loaded, **counters["inductor"]}))
"""


def compile_in_new_process(folder: Path, inductor_cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], env=env, check=True, capture_output=True,
                          text=True, timeout=900)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_new_machine_with_the_bundle_compiles_nothing(tmp_path):
    folder = tmp_path / "bundles"
    first = compile_in_new_process(folder, tmp_path / "inductor_a")  # a cold machine, no bundles yet
    assert first["loaded"] == 0 and first["fxgraph_cache_miss"] == 2 and not first.get("fxgraph_cache_hit")
    bundles = list(folder.glob("*.bin"))
    assert len(bundles) == 1 and bundles[0].stat().st_size > 0
    assert not list(folder.glob(".*"))  # no partial file left behind
    second = compile_in_new_process(folder, tmp_path / "inductor_b")  # another machine: an empty cache
    assert second["loaded"] == 1
    assert second.get("fxgraph_cache_hit", 0) == 2 and not second.get("fxgraph_cache_miss")
    assert list(folder.glob("*.bin")) == bundles  # the same graphs: the same file, not a second copy


def test_a_bundle_that_does_not_load_is_named_and_skipped(tmp_path, monkeypatch, caplog):
    (tmp_path / "a_broken.bin").write_bytes(b"not a bundle")
    (tmp_path / "b_good.bin").write_bytes(b"fine")
    (tmp_path / "notes.txt").write_text("not a bundle either, and not read")
    seen = []

    def load(data: bytes):
        seen.append(data)
        if data == b"not a bundle":
            raise RuntimeError("checksum does not match")
        return SimpleNamespace(artifacts={})

    monkeypatch.setattr(compile_bundles.torch.compiler, "load_cache_artifacts", load)
    with caplog.at_level(logging.WARNING, logger="hdrq"):
        assert load_bundles(tmp_path) == (1, set())
    assert seen == [b"not a bundle", b"fine"]
    assert "a_broken.bin" in caplog.text and "checksum does not match" in caplog.text
    # torch's own reaction to a corrupt blob (this torch: a logged warning and None; others raise)
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hdrq"):
        assert load_bundles(tmp_path) == (0, set())
    assert "a_broken.bin" in caplog.text and "b_good.bin" in caplog.text


def test_bundle_names_follow_the_graphs_not_the_order(tmp_path, monkeypatch):
    artifacts = {"inductor": ["k2", "k1"], "aot_autograd": ["a1"]}
    reordered = {"aot_autograd": ["a1"], "inductor": ["k1", "k2"]}
    assert bundle_name(artifacts) == bundle_name(reordered) != bundle_name({"inductor": ["k1"]})
    monkeypatch.setattr(compile_bundles.torch.compiler, "save_cache_artifacts",
                        lambda: (b"bytes", SimpleNamespace(artifacts=artifacts)))
    path = save_bundle(tmp_path / "new" / "folder")  # created on the way
    assert path.read_bytes() == b"bytes" and path.name == bundle_name(artifacts)
    monkeypatch.setattr(compile_bundles.torch.compiler, "save_cache_artifacts",
                        lambda: (b"other bytes", SimpleNamespace(artifacts=reordered)))
    assert save_bundle(tmp_path / "new" / "folder") == path and path.read_bytes() == b"bytes"  # kept
    monkeypatch.setattr(compile_bundles.torch.compiler, "save_cache_artifacts", lambda: None)
    assert save_bundle(tmp_path / "empty") is None and not (tmp_path / "empty").exists()


def test_a_run_that_only_loaded_adds_no_bundle(tmp_path, monkeypatch):
    """A run whose graphs all came from the loaded bundles writes none, also where it autotuned a kernel anew (its
    list then hashes to another name); one new graph: a bundle."""
    loaded = {"inductor": ["k1", "k2"], "aot_autograd": ["a1"], "autotune": ["t1"]}
    (tmp_path / "first.bin").write_bytes(b"first")
    monkeypatch.setattr(compile_bundles.torch.compiler, "load_cache_artifacts",
                        lambda data: SimpleNamespace(artifacts=loaded))
    count, known = load_bundles(tmp_path)
    assert count == 1 and known == {"inductor:k1", "inductor:k2", "aot_autograd:a1", "autotune:t1"}
    subset = {"inductor": ["k2", "k1"], "aot_autograd": ["a1"]}
    monkeypatch.setattr(compile_bundles.torch.compiler, "save_cache_artifacts",
                        lambda: (b"again", SimpleNamespace(artifacts=subset)))
    assert save_bundle(tmp_path, known) is None and sorted(p.name for p in tmp_path.iterdir()) == ["first.bin"]
    # what a GPU run that loaded every graph showed: one autotuning result of its own, no new graph
    retuned = {**subset, "autotune": ["t1", "t2"]}
    monkeypatch.setattr(compile_bundles.torch.compiler, "save_cache_artifacts",
                        lambda: (b"retuned", SimpleNamespace(artifacts=retuned)))
    assert save_bundle(tmp_path, known) is None and sorted(p.name for p in tmp_path.iterdir()) == ["first.bin"]
    grown = {**subset, "inductor": ["k1", "k2", "k3"]}
    monkeypatch.setattr(compile_bundles.torch.compiler, "save_cache_artifacts",
                        lambda: (b"more", SimpleNamespace(artifacts=grown)))
    path = save_bundle(tmp_path, known)
    assert path.name == bundle_name(grown) and path.read_bytes() == b"more"


def test_the_callback_does_nothing_without_compile_and_survives_a_failed_save(tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(compile_bundles, "load_bundles", lambda folder: calls.append("load") or (1, {"k"}))
    monkeypatch.setattr(compile_bundles, "save_bundle", lambda folder, known: calls.append("save"))
    eager = SimpleNamespace(runtime=Runtime(compile=False))
    callback = CompileBundlesCallback(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="hdrq"):
        callback.setup(None, eager, "fit")
        callback.on_train_end(None, eager)
    assert calls == [] and "quant.runtime.compile is off" in caplog.text
    CompileBundlesCallback(None).setup(None, SimpleNamespace(runtime=Runtime(compile=True)), "fit")
    assert calls == []

    def fail(folder, known):
        assert known == {"k"}  # what was loaded: not written again
        raise OSError("No space left on device")

    monkeypatch.setattr(compile_bundles, "save_bundle", fail)
    compiled = SimpleNamespace(runtime=Runtime(compile=True))
    callback.setup(None, compiled, "fit")
    assert calls == ["load"] and callback.loaded == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hdrq"):
        callback.on_train_end(None, compiled)  # the run is done: a warning, not an exception
    assert "No space left on device" in caplog.text


def test_a_bundle_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "bundle.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="compile_bundles.*is a file; give a folder"):
        Runtime(compile=True, compile_bundles=str(tmp_path / "bundle.bin"))
    Runtime(compile=True, compile_bundles=str(tmp_path / "not yet there"))  # created when the first run ends


@pytest.mark.slow
def test_the_quantize_stage_adds_a_bundle_and_loads_it_next_time(compose_cfg, finished, tmp_path, caplog):
    """Through `hdrq quantize` with Inductor on the CPU (from conftest's finished runs): the first run adds its
    bundle, a forced re-run loads it."""
    bundles = tmp_path / "bundles"
    overrides = (ONE_TARGET, "quant=qdrop", "force=true", "quant.runtime.compile=true",
                 f"quant.runtime.compile_bundles={bundles}")
    run_quantize(compose_cfg("quantize", *overrides))
    written = list(bundles.glob("*.bin"))
    assert len(written) == 1
    with caplog.at_level(logging.INFO, logger="hdrq"):
        run_quantize(compose_cfg("quantize", *overrides))
    assert f"compile bundles: 1 loaded from {bundles}" in caplog.text
    assert list(bundles.glob("*.bin")) == written
