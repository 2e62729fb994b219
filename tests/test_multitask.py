"""The task-arithmetic setting from local files (experiment=clip_vit_b32): a multi-task ViT (one encoder, a head per
task), task image folders, and `hdrq pmq` on a base and experts read from files, on a random tiny ViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from safetensors.torch import save_file
from tiny import CONF_DIR

from hdrq_lightning.artifacts import read_json
from hdrq_lightning.data.task_folders import TaskFoldersDataModule
from hdrq_lightning.errors import ArtifactError, ConfigError, DataError
from hdrq_lightning.evaluation import DomainEvaluator, evaluate_domains
from hdrq_lightning.metrics import harmonic_mean
from hdrq_lightning.models.io import load_model_file
from hdrq_lightning.models.multitask import build_multitask_vit
from hdrq_lightning.quant.export import load_integer_file
from hdrq_lightning.stages.evaluate import evaluate_run
from hdrq_lightning.stages.pmq import run_pmq

TASKS = {"shapes": 3, "colors": 2}
VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
MODEL = ["model.backbone=vit_tiny_patch16_224",
         "model.backbone_args={img_size:32,patch_size:8,embed_dim:48,depth:2,num_heads:3}"]


def _network():
    return build_multitask_vit("vit_tiny_patch16_224", TASKS, VIT)


def _folders(root, per_class=(6, 4)):
    rng = np.random.default_rng(0)
    for task, classes in TASKS.items():
        for split, count in zip(("train", "test"), per_class):
            for c in range(classes):
                folder = root / task / split / f"class{c}"
                folder.mkdir(parents=True)
                for i in range(count):
                    pixels = np.clip(rng.normal(60 + 60 * c, 40, (36, 40, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_encoder_units_compose_to_the_features_and_heads_stay_float():
    torch.manual_seed(0)
    model = _network().eval()
    x = torch.randn(2, 3, 32, 32)
    units = model.reconstruction_units()
    assert [name for name, _ in units] == ["encoder.embed", "encoder.blocks.0", "encoder.blocks.1", "encoder.pool"]
    out = x
    for _, unit in units:
        out = unit(out)
    assert torch.equal(out, model.features(x))
    model.select_task("colors")
    assert model(x).shape == (2, 2) and torch.equal(model(x), model.heads["colors"](out))
    # every Linear/Conv of the encoder is inside exactly one unit; no head is
    inside = [id(m) for _, unit in units for m in unit.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    encoder = [id(m) for m in model.encoder.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(inside) == sorted(encoder) and len(set(inside)) == len(inside)
    assert model.quant_facts().skip == ("heads",)
    with pytest.raises(ConfigError, match="no head"):
        model.select_task("dogs")


def test_task_folders_read_each_task_and_refuse_bad_layouts(tmp_path):
    root = _folders(tmp_path / "tasks")
    dm = TaskFoldersDataModule(str(root), ["shapes", "colors"], image_size=32)
    assert dm.num_classes == TASKS and dm.targets == ("shapes", "colors")
    images, labels, _ = next(iter(dm.calibration_loader("shapes", size=5)))
    assert images.shape == (5, 3, 32, 32) and set(labels.tolist()) <= {0, 1, 2}
    assert sum(len(b[1]) for b in dm.loader("colors", "test")) == 8
    again = [b[2].tolist() for b in TaskFoldersDataModule(str(root), ["shapes", "colors"], image_size=32)
             .calibration_loader("shapes", size=5)]
    assert again == [b[2].tolist() for b in dm.calibration_loader("shapes", size=5)]  # seeded, same images
    with pytest.raises(DataError, match="Task folder .*dogs.* is missing"):
        TaskFoldersDataModule(str(root), ["dogs"])
    (root / "colors" / "test" / "class1").rename(root / "colors" / "test" / "class9")
    with pytest.raises(DataError, match="differ between train and test"):
        TaskFoldersDataModule(str(root), ["colors"])
    with pytest.raises(ConfigError, match="data.root is required"):
        TaskFoldersDataModule(None, ["colors"])


def test_evaluators_score_each_task_with_its_own_head_on_the_test_subset(tmp_path):
    """DomainEvaluator (the analysis) and evaluate_domains switch to each task's head; max_test_images keeps a
    seeded subset of the test split. Loss and score recomputed by hand."""
    root = _folders(tmp_path / "tasks")
    dm = TaskFoldersDataModule(str(root), ["shapes", "colors"], image_size=32, max_test_images=5)
    assert sum(len(b[1]) for b in dm.loader("colors", "test")) == 5
    torch.manual_seed(0)
    model = _network().eval()
    losses, scores = [], []
    with torch.no_grad():
        for task in TASKS:
            x = torch.cat([b[0] for b in dm.loader(task, "test")])
            y = torch.cat([b[1] for b in dm.loader(task, "test")])
            logits = model.heads[task](model.features(x))
            losses.append(float(torch.nn.functional.cross_entropy(logits, y)))
            scores.append(100.0 * float((logits.argmax(1) == y).float().mean()))
    model.select_task("shapes")  # the evaluators must switch heads themselves
    loss, hmean = DomainEvaluator(dm, ["shapes", "colors"], None, torch.device("cpu"))(model)
    assert loss == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert hmean == pytest.approx(harmonic_mean(scores), abs=1e-4)
    result = evaluate_domains(model, dm, ["shapes", "colors"], device=torch.device("cpu"))
    assert [result["per_domain"][t] for t in TASKS] == pytest.approx(scores, abs=1e-3)


@pytest.fixture
def clip_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("HDRQ_RUNS_DIR", str(tmp_path / "runs"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield lambda stage, *overrides: compose("config", overrides=[
            f"stage={stage}", "experiment=clip_vit_b32", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            f"data.root={tmp_path / 'tasks'}", "data.targets=[shapes,colors]", "data.image_size=32", *MODEL,
            *overrides])


def _files(tmp_path):
    """A base (a bare timm encoder, safetensors), two experts (the network's layout, torch files, each with its
    own head) = base + a random task vector."""
    torch.manual_seed(1)
    base = _network()
    save_file({k.removeprefix("encoder."): v.contiguous() for k, v in base.state_dict().items()
               if k.startswith("encoder.")}, tmp_path / "base.safetensors")
    paths = {}
    for task in TASKS:
        expert = _network()
        state = {k: v + 0.02 * torch.randn_like(v) if k.startswith("encoder.") else v
                 for k, v in base.state_dict().items()}
        state.update({k: v for k, v in expert.state_dict().items() if k.startswith(f"heads.{task}.")})
        torch.save({"state_dict": {k: v for k, v in state.items()
                                   if not k.startswith("heads.") or k.startswith(f"heads.{task}.")}},
                   tmp_path / f"{task}.pt")
        paths[task] = tmp_path / f"{task}.pt"
    return [f"pmq.models.base={tmp_path / 'base.safetensors'}",
            *(f"+pmq.models.experts.{task}={path}" for task, path in paths.items())]


def test_pmq_on_models_from_files_with_a_head_per_task(clip_cfg, tmp_path):
    _folders(tmp_path / "tasks")
    files = _files(tmp_path)
    small = ["pmq.calibration_size=8", "pmq.chunk=8", "pmq.w_bits=4"]
    cfg = clip_cfg("pmq", "pmq=epmq", *small, *files)
    result = run_pmq(cfg)
    run = tmp_path / "runs" / "clip_vit_b32" / "pmq" / "task_arithmetic_epmq_w4"
    assert set(result["per_domain"]) == set(TASKS) and set(result["fp_merge"]["per_domain"]) == set(TASKS)
    layers = read_json(run / "layers.json")
    names = {r["layer"] for r in layers}
    assert "encoder.patch_embed.proj" in names and "encoder.blocks.1.attn.qkv" in names
    assert not any(n.startswith("heads.") for n in names)
    assert {r["bits"] for r in layers} == {4, 8}
    state, _ = load_integer_file(run / "quantized.safetensors")
    assert any(k.endswith("qkv.weight_int") for k in state) and not any(k.startswith("heads.") and "_int" in k
                                                                         for k in state)
    # each task scored with its own head: recomputed by hand from the written file
    model = load_model_file(run / "quantized.safetensors").eval()
    from hdrq_lightning.data.task_folders import TaskFoldersDataModule as DM

    dm = DM(str(tmp_path / "tasks"), list(TASKS), image_size=32)
    for task in TASKS:
        model.select_task(task)
        hits = total = 0
        with torch.no_grad():
            for images, labels, _ in dm.loader(task, "test"):
                hits += int((model(images).argmax(1) == labels).sum())
                total += len(labels)
        assert round(100 * hits / total, 4) == pytest.approx(result["per_domain"][task], abs=1e-3)
    # the integer file round-trips through `hdrq evaluate`
    assert evaluate_run(cfg, "pmq", "task_arithmetic_epmq_w4")["per_domain"] == result["per_domain"]

    # a finished run is not reused once a file it was made from has other contents
    torch.save(torch.load(tmp_path / "colors.pt") | {"extra": torch.zeros(1)}, tmp_path / "colors.pt")
    with pytest.raises(ArtifactError, match="other contents of the pmq.models files .*experts.colors"):
        run_pmq(clip_cfg("pmq", "pmq=epmq", *small, *files))
    assert run_pmq(clip_cfg("pmq", "pmq=epmq", "force=true", *small, *files))["status"] == "done"

    # the stages that train or read the experiment's own runs refuse this data with one paragraph
    from hdrq_lightning.stages.common import build_datamodule

    with pytest.raises(ConfigError, match="serves only the pmq, evaluate stages"):
        build_datamodule(clip_cfg("pipeline"))

    # GPTQ-on-merged on the same files, and bad inputs: one paragraph each, no run dir
    assert run_pmq(clip_cfg("pmq", "pmq=gptq", *small, *files))["status"] == "done"
    with pytest.raises(ConfigError, match="one file per task"):
        run_pmq(clip_cfg("pmq", "pmq=gptq", "pmq.tag=x", *small, *files[:2]))
    with pytest.raises(ArtifactError, match="does not exist"):
        run_pmq(clip_cfg("pmq", "pmq=gptq", "pmq.tag=y", *small, *files[:2], "+pmq.models.experts.colors=/no/file"))
    with pytest.raises(ArtifactError, match="does not fit the network"):
        run_pmq(clip_cfg("pmq", "pmq=gptq", "pmq.tag=z", *small, *files,
                         "model.backbone_args={img_size:32,patch_size:8,embed_dim:48,depth:3,num_heads:3}"))
    assert not any((run.parent / f"task_arithmetic_gptq_w4_{t}").exists() for t in "xyz")
