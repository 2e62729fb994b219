"""The built-in transformer benchmark (experiment=vit_tasks): the four tasks and the pretext, step-indexed batches,
the base (pretext + probes) and expert (head frozen) plug-ins, a killed run's resume, and the pipeline's post-merge
tables on tiny settings."""

from __future__ import annotations

import json

import pytest
import torch
from resume import killed_resumed_and_uninterrupted, same_tensors
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from hdrq_lightning.adapt.multitask import EpochBatches, FinetuneModule, PretextModule
from hdrq_lightning.artifacts import load_weights
from hdrq_lightning.cli import main
from hdrq_lightning.data.builtin_tasks import TASKS, BuiltinTasksDataModule
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.models.multitask import build_multitask_vit

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
SMALL = ["model.backbone_args={img_size:32,patch_size:8,embed_dim:32,depth:1,num_heads:2}", "data.photo_train=12",
         "data.photo_test=6", "trainer.accelerator=cpu", "threads=2"]


@pytest.fixture(scope="module")
def dm():
    return BuiltinTasksDataModule(photo_train=12, photo_test=6)


def test_tasks_labels_splits_and_standardisation(dm):
    assert dm.targets == tuple(TASKS) and dm.num_classes == TASKS and dm.source == "pretext"
    for task, classes in TASKS.items():
        for split in ("train", "test"):
            items = dm.dataset(task, split)
            assert items.images.shape[1:] == (3, 32, 32) and len(items.classes) == classes
            assert set(items.labels.tolist()) == set(range(classes))
    assert len(dm.dataset("photo", "train")) == 12 * 10 and len(dm.dataset("photo", "test")) == 6 * 10
    # photo test crops come from the right 30% of each photo: none equals a train crop
    train, test = dm.dataset("photo", "train").images, dm.dataset("photo", "test").images
    assert torch.cdist(test.flatten(1), train.flatten(1)).min() > 0
    # parity: the rotated digits' labels mod 2; the digit task's pools are the project's seeded split
    assert len(dm.dataset("parity", "test")) == len(dm.dataset("digit", "test")) == 450
    pooled = torch.cat([items.images for _, items in dm.pretext_sets()])
    assert torch.allclose(pooled.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(pooled.std((0, 2, 3)), torch.ones(3), atol=1e-3)
    calibration = torch.cat([x for x, _, _ in dm.calibration_loader("textured", 40)])
    again = torch.cat([x for x, _, _ in dm.calibration_loader("textured", 40)])
    assert calibration.shape[0] == 40 and torch.equal(calibration, again)
    with pytest.raises(ConfigError, match="built-in tasks"):
        BuiltinTasksDataModule(targets=["digit", "faces"])
    with pytest.raises(ConfigError, match="pretext has no test split"):
        dm.loader("pretext", "test")


def test_epoch_batches_are_indexed_by_step():
    images, labels = torch.randn(10, 3, 8, 8), torch.arange(10)
    full = EpochBatches(images, labels, labels, 4, 9, start=lambda: 0, seed=3, shift=1)
    batches = list(full)
    assert full.per_epoch == 3 and len(batches) == 9
    for epoch in range(3):  # each epoch visits every item once
        assert sorted(torch.cat([b[1] for b in batches[3 * epoch:3 * epoch + 3]]).tolist()) == list(range(10))
    tail = list(EpochBatches(images, labels, labels, 4, 9, start=lambda: 5, seed=3, shift=1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches[5:], tail))
    assert not torch.equal(batches[0][1], batches[3][1])  # epochs are shuffled differently


def _fit(module, steps):
    import lightning as L

    trainer = L.Trainer(max_steps=steps, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)


def test_finetune_trains_the_encoder_with_the_task_head_frozen(dm):
    torch.manual_seed(0)
    model = build_multitask_vit("vit_tiny_patch16_224", dm.num_classes, VIT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = FinetuneModule(model, dm, "parity", epochs=1, batch_size=64)
    assert module.iterations == -(-len(dm.dataset("parity", "train")) // 64) and model.task == "parity"
    _fit(module, 3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("heads."))
    assert not torch.equal(before["encoder.blocks.0.attn.qkv.weight"], after["encoder.blocks.0.attn.qkv.weight"])
    with pytest.raises(ConfigError, match="warmup_pct"):
        FinetuneModule(model, dm, "parity", warmup_pct=1.5)


def test_pretext_trains_the_encoder_then_fits_each_task_probe(dm):
    torch.manual_seed(0)
    model = build_multitask_vit("vit_tiny_patch16_224", dm.num_classes, VIT)
    module = PretextModule(model, dm, epochs=1)
    assert len(module.pretext_heads) == 2 and module.pretext_heads[1].out_features == 4
    assert module.iterations == -(-sum(len(items) for _, items in dm.pretext_sets()) // 64)
    _fit(module, 4)  # on_fit_end fits the probes
    model.eval()
    for task, classes in TASKS.items():  # each probe is the logistic regression of its task's train features:
        train = dm.dataset(task, "train")  # its loss is that of scikit-learn's solver (an independent fit)
        model.select_task(task)
        with torch.no_grad():
            features = model.features(train.images)
            loss = float(torch.nn.functional.cross_entropy(model.heads[task](features), train.labels))
            penalty = 0.5 * 1e-3 * float(model.heads[task].weight.square().sum())
        # the same objective in scikit-learn's terms: C = 1 / (decay x n); a binary softmax's two rows are one
        # logistic weight w = w1 - w2 with w1 = -w2 at the optimum, i.e. half the penalty: C doubles
        c = (2.0 if classes == 2 else 1.0) / (1e-3 * len(train))
        reference = LogisticRegression(C=c, max_iter=10000, tol=1e-10).fit(features.numpy(), train.labels.numpy())
        probabilities = reference.predict_proba(features.numpy())
        scale = 0.5 if classes == 2 else 1.0
        best = log_loss(train.labels.numpy(), probabilities) + scale * 0.5 * 1e-3 * float((reference.coef_ ** 2).sum())
        assert abs((loss + penalty) - best) < 1e-3, (task, loss + penalty, best)
    with pytest.raises(ConfigError, match="pretext sets"):
        PretextModule(model, object())


@pytest.mark.slow
def test_killed_pretext_run_resumes_to_the_same_base(tmp_path):
    """The base's training killed after its first checkpoint and re-run ends with the weights (probes included) of
    an uninterrupted run: the batches come from (seed, step), the schedule and optimizer from the checkpoint."""
    (tmp_path / "runs" / "nothing").mkdir(parents=True)  # the source stage reads no earlier run
    resumed, uninterrupted, log = killed_resumed_and_uninterrupted(
        ["source", "experiment=vit_tasks", *SMALL, "source.epochs=6", "source.checkpoint_every=5",
         "source.probe_steps=20"], tmp_path / "runs", "vit_tasks/source/pretext", "nothing", tmp_path)
    assert "resuming source/pretext from checkpoint" in log
    assert same_tensors(resumed, uninterrupted)


def test_pipeline_on_the_builtin_tasks_writes_the_post_merge_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("HDRQ_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    main(["pipeline", "experiment=vit_tasks", *SMALL, "trainer.enable_progress_bar=false", "source.epochs=1",
          "adapt.epochs=1", "source.probe_steps=20", "pmq.calibration_size=32", "pipeline.pmq.bits=[3]",
          "pipeline.pmq.methods=[gptq,epmq]"])
    out = tmp_path / "runs" / "vit_tasks"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"] == list(TASKS) and summary["results"] == [] and summary["source"] == "pretext"
    rows = summary["pmq"]["rows"]
    assert [(r["merge"], r["method"], r["quantize"]) for r in rows] == [
        ("task_arithmetic", "gptq", True), ("task_arithmetic", "epmq", True), ("ties", "gptq", True),
        ("ties", "epmq", True), ("task_arithmetic", "epmq", False), ("ties", "epmq", False)]
    # every expert kept the base's heads (frozen): the merges hold the base's heads
    base = load_weights(out / "source" / "pretext" / "model.safetensors")
    merged = load_weights(out / "merge" / "fp_task_arithmetic" / "merged.safetensors")
    head_keys = [k for k in merged if k.startswith("heads.")]
    assert len(head_keys) == 2 * len(TASKS) and all(torch.equal(merged[k], base[k]) for k in head_keys)
    text = (out / "summary.md").read_text()
    assert "| experts (each on its own target) |" in text and "| task_arithmetic | E-PMQ |" in text
    assert not (out / "comparison.png").exists()  # no quantize-then-merge rows to compare


def test_stages_the_builtin_tasks_do_not_serve_are_one_paragraph(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "hdrq_lightning.cli", "quantize", "experiment=vit_tasks",
                          f"paths.runs_dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "serves only the source, adapt, pmq, merge, evaluate, pipeline stages" in " ".join(out.stderr.split())
    assert not (tmp_path / "vit_tasks" / "quantize").exists()
