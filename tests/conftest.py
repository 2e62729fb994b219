"""Shared fixtures: a composed config writing into tmp_path, finished source/adapt/quantize runs to start from, exact
TF32 settings per test, and a GPU-only marker helper."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from tiny import CONF_DIR, ONE_TARGET, TINY

from hdrq_lightning.callbacks.compile_ahead import apply_precision_settings, precision_settings
from hdrq_lightning.stages.adapt import run_adapt
from hdrq_lightning.stages.quantize import run_quantize
from hdrq_lightning.stages.source import run_source


def run_if_gpu():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def compose_cfg(tmp_path, monkeypatch):
    """compose_cfg(stage, *overrides) -> DictConfig with runs under tmp_path (Hydra's compose API)."""
    monkeypatch.setenv("HDRQ_RUNS_DIR", str(tmp_path / "runs"))
    GlobalHydra.instance().clear()
    context = initialize_config_dir(config_dir=CONF_DIR, version_base="1.3")
    context.__enter__()

    def _compose(stage: str, *overrides: str):
        return compose("config", overrides=[f"stage={stage}", *TINY, *overrides])

    yield _compose
    context.__exit__(None, None, None)


@pytest.fixture
def streets_cfg(tmp_path, monkeypatch):
    """compose(stage, *overrides) for experiment=streets with runs under tmp_path (the digits TINY overrides name
    keys the segmentation plug-ins do not have)."""
    monkeypatch.setenv("HDRQ_RUNS_DIR", str(tmp_path / "runs"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield lambda stage, *overrides: compose("config", overrides=[
            f"stage={stage}", "experiment=streets", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
            *overrides])


@pytest.fixture(autouse=True)
def _single_thread_and_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, int(os.environ.get("HDRQ_TEST_THREADS", "2"))))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_precision_settings():
    """TF32 settings back exactly as they were (a test that set them, e.g. through Runtime.apply_precision, would
    otherwise change the compile-cache keys of every later test: the compile-ahead worker replicates them)."""
    settings = precision_settings()
    yield
    apply_precision_settings(settings)


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory):
    """source, adapt and a QDrop W4A4 quantize run of the digits target ``negative`` (tiny settings), made once for
    the module that uses it."""
    root = tmp_path_factory.mktemp("finished") / "runs"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HDRQ_RUNS_DIR", str(root))
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            def cfg(stage, *overrides):
                return compose("config", overrides=[f"stage={stage}", *TINY, ONE_TARGET, *overrides])

            run_source(cfg("source"))
            run_adapt(cfg("adapt"))
            run_quantize(cfg("quantize", "quant=qdrop"))
        GlobalHydra.instance().clear()
    return root / "digits"


@pytest.fixture
def finished(finished_once, compose_cfg, tmp_path):
    """A copy of those runs under this test's runs dir (tests delete and rewrite parts of it)."""
    target = tmp_path / "runs" / "digits"
    shutil.copytree(finished_once, target)
    return target
