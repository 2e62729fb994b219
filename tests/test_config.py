"""Every config group composes and instantiates; the CLI prints configs and stages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from omegaconf import OmegaConf

from hdrq_lightning.artifacts import StageRun
from hdrq_lightning.errors import HdrqError
from hdrq_lightning.merge import get_merge_method
from hdrq_lightning.models.build import architecture
from hdrq_lightning.models.build import build_model as build_from_config
from hdrq_lightning.quant.recipe import Recipe
from hdrq_lightning.stages.common import build_datamodule, build_loggers, build_model

CONF = Path(__file__).resolve().parent.parent / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("preset", options("quant"))
def test_quant_presets_build_recipes(compose_cfg, preset):
    recipe = Recipe.from_config(compose_cfg("quantize", f"quant={preset}").quant)
    assert recipe.method == preset
    assert 2 <= recipe.w_bits <= 8


def test_presets_are_one_engine_with_the_paper_settings(compose_cfg):
    brecq, qdrop, hdrq = (Recipe.from_config(compose_cfg("quantize", f"quant={p}", "quant.iters=20000").quant)
                          for p in ("brecq", "qdrop", "hdrq"))
    assert brecq.passes == ["weights", "activations"] and brecq.input_quant_prob == 1.0 and brecq.drop_prob == 0
    assert qdrop.passes == ["joint"] and qdrop.input_quant_prob == 0.5 and qdrop.drop_prob == 0.5
    assert hdrq.noise.enabled and hdrq.distance_weight == 0.05 and hdrq.weight.rounding == "latent"
    assert hdrq.noise.switch_iteration(hdrq.iters) == 20000 - 3500


@pytest.mark.parametrize("field", ["input_quant_prob", "drop_prob"])
def test_qdrop_probabilities_outside_0_1_are_refused(compose_cfg, field):
    from hdrq_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=f"quant.{field}=1.5 is not a probability"):
        Recipe.from_config(compose_cfg("quantize", "quant=qdrop", f"quant.{field}=1.5").quant)


@pytest.mark.parametrize("merge", options("merge"))
def test_merge_groups_build_methods(compose_cfg, merge):
    cfg = compose_cfg("merge", f"merge={merge}")
    get_merge_method(cfg.merge.method, **OmegaConf.to_container(cfg.merge.params, resolve=True))


@pytest.mark.parametrize("model", options("model"))
def test_model_groups_build(compose_cfg, model):
    cfg = compose_cfg("source", f"model={model}")
    classes = {"a": 5} if model.startswith("vit_") else 5  # the multi-task networks: classes per task
    net = build_model(cfg, num_classes=classes)
    classifier = (net.heads["a"] if hasattr(net, "heads") else net.classifier if hasattr(net, "classifier")
                  else net.head.classifier)  # multi-task ViT / SHOT net / SegNet
    assert (getattr(classifier, "out_features", None) or classifier.out_channels) == 5
    # the architecture the compile-ahead worker and model files rebuild from: the same parameters, by name and shape
    twin = build_from_config(architecture(cfg.model, classes))
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_groups_instantiate(compose_cfg, trainer, tmp_path):
    cfg = compose_cfg("source", f"trainer={trainer}", "trainer.accelerator=cpu")
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    L.Trainer(logger=False, default_root_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_groups_build(compose_cfg, logger, tmp_path):
    cfg = compose_cfg("source", f"logger={logger}")
    loggers = build_loggers(cfg, StageRun(tmp_path / "run").prepare(), "source", ["test"])
    assert loggers[0].__class__.__name__ == "CSVLogger"
    assert len(loggers) == (2 if logger == "wandb" else 1)


def test_digits_datamodule_instantiates(compose_cfg):
    dm = build_datamodule(compose_cfg("source"))
    assert dm.num_classes == 10 and dm.source == "clean" and len(dm.targets) == 3


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose(tmp_path, monkeypatch, experiment):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from tiny import CONF_DIR

    monkeypatch.setenv("HDRQ_RUNS_DIR", str(tmp_path))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # each experiment as it ships
        cfg = compose("config", overrides=["stage=pipeline", f"experiment={experiment}"])
    assert cfg.name
    OmegaConf.to_container(cfg, resolve=True)


def test_office_home_without_data_is_a_clear_error(compose_cfg, tmp_path):
    cfg = compose_cfg("source", "experiment=office_home", f"data.root={tmp_path / 'missing'}")
    with pytest.raises(HdrqError, match="OfficeHome|root|layout"):
        build_datamodule(cfg)


def _hdrq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hdrq_lightning.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=1800)


def test_cli_lists_stages_and_prints_config(tmp_path):
    out = _hdrq("--help", cwd=tmp_path)
    assert out.returncode == 0
    for stage in ("source", "adapt", "quantize", "merge", "pmq", "evaluate", "analyze", "pipeline"):
        assert stage in out.stdout
    out = _hdrq("quantize", "quant=qdrop", "quant.w_bits=3", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "method: qdrop" in out.stdout and "w_bits: 3" in out.stdout
    # a multirun (sweep) is launched (its first job then fails fast: w_bits out of range)
    out = _hdrq("quantize", "quant=qdrop,hdrq", "quant.w_bits=12", "-m", f"paths.runs_dir={tmp_path}", cwd=tmp_path)
    assert "Launching 2 jobs" in out.stdout + out.stderr and "#0 : quant=qdrop" in out.stdout + out.stderr


def test_cli_bad_input_is_one_paragraph(tmp_path):
    out = _hdrq("source", "experiment=office_home", f"data.root={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "error: hdrq source:" in out.stderr
    out = _hdrq("quantize", "quant.w_bits=12", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "2 to 8" in out.stderr
    # the segmentation data: a missing root names the expected tree, before any run dir exists
    out = _hdrq("adapt", "experiment=gta_cs_idd", f"data.root={tmp_path / 'nowhere'}", f"paths.runs_dir={tmp_path}",
                cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "<root>/GTA5/images" in out.stderr
    assert not (tmp_path / "gta_cs_idd" / "adapt").exists() and not (tmp_path / "gta_cs_idd" / "source").exists()
    out = _hdrq("frobnicate", cwd=tmp_path)
    assert out.returncode == 2 and "unknown stage" in out.stderr
    # every DDP rank would run every stage: the error says how to run the reconstructions data-parallel
    out = _hdrq("pipeline", "trainer=ddp", f"paths.runs_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "then `hdrq pipeline` without trainer=ddp" in " ".join(out.stderr.split())
    assert not (tmp_path / "digits" / "source").exists()


def test_hydra_flags_go_before_the_overrides():
    from hdrq_lightning.cli import split_hydra_flags

    assert split_hydra_flags(["quant=qdrop", "-m", "--cfg", "job", "seed=1"]) == (
        ["-m", "--cfg", "job"], ["quant=qdrop", "seed=1"])
    assert split_hydra_flags(["--info", "quant.w_bits=3"]) == (["--info"], ["quant.w_bits=3"])


@pytest.mark.parametrize("task", options("task"))
def test_task_groups_build(compose_cfg, task):
    from hydra.utils import instantiate

    data = ["data=streets"] if task == "segmentation" else []  # its number of classes is the data's
    built = instantiate(compose_cfg("evaluate", f"task={task}", *data).task)
    assert built.metric_name and callable(built.metric) and callable(built.loss)
